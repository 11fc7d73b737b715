"""Scripts that run inside the TorchServe pods (shipped to them in the ModelDeployment's ConfigMap).

They are real modules so that ruff and mypy check them; each uses the standard library only, because the
server image's Python runs them as plain files (``python /etc/flownexus/<script>.py``).
"""

from importlib.resources import files


def source(script: str) -> str:
    """The text of one script, as it goes into the ConfigMap."""
    return files(__package__).joinpath(f"{script}.py").read_text(encoding="utf-8")

"""Flow Nexus init container: copy the model archive into the model store, render config.properties."""

import json
import os
import shutil
import sys
import zipfile


def main() -> None:
    archive, name = os.environ["FLOWNEXUS_ARCHIVE"], os.environ["FLOWNEXUS_MODEL_NAME"]
    store, conf, template = os.environ["FLOWNEXUS_MODEL_STORE"], os.environ["FLOWNEXUS_CONF_DIR"], sys.argv[1]
    try:
        open(archive, "rb").close()
    except FileNotFoundError:
        sys.exit(f"model archive {archive} does not exist in the artifact store")
    except OSError as exc:  # an artifact store the pod's uid cannot search reads as "missing" to isfile()
        sys.exit(f"model archive {archive} cannot be read as uid {os.getuid()}: {exc.strerror}")
    try:
        with zipfile.ZipFile(archive) as mar:
            version = str(json.loads(mar.read("MAR-INF/MANIFEST.json"))["model"]["modelVersion"])
    except (zipfile.BadZipFile, KeyError, ValueError) as exc:
        sys.exit(f"{archive} is not a TorchServe model archive: {exc}")
    target = os.path.join(store, name + ".mar")
    shutil.copyfile(archive, target + ".part")
    os.replace(target + ".part", target)
    with open(os.path.join(template, "model-settings.json"), encoding="utf-8") as f:
        settings = json.load(f)
    with open(os.path.join(template, "config.properties"), encoding="utf-8") as f:
        properties = f.read()
    properties += "models=" + json.dumps({name: {version: settings}}, separators=(",", ":")) + "\n"
    with open(os.path.join(conf, "config.properties"), "w", encoding="utf-8") as f:
        f.write(properties)
    print(f"serving {archive} as {name} version {version}")


if __name__ == "__main__":
    main()

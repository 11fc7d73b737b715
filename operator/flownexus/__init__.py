"""Flow Nexus: a Kubernetes operator that trains, gates, serves and canaries neural networks.

Layers (each may import only the ones before it): ``api`` (types) <- ``builders`` (pure manifests)
<- ``reconcilers`` (decisions + the one API client in ``kube``) <- ``handlers`` (Kopf registrations).
"""

GROUP = "flownexus.io"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
__version__ = "0.1.0"

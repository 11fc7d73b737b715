"""Kopf registrations for ModelDeployment (imported by ``handlers``)."""

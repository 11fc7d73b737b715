// The pod sandbox ("pause") process, built here because registry.k8s.io cannot be reached.
module flownexus.dev/build/pause

go 1.26.0

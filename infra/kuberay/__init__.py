"""testbench on Kubernetes with KubeRay: manifests, image, and their checks (checks/)."""

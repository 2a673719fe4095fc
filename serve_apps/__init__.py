"""Ray Serve applications (LLM node, diffusion node, jobs, evaluations, proof of compute)."""

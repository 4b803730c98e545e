"""maskmix mixture optimizer: baselines, DoReMi and data mixing laws with diffusion proxies."""

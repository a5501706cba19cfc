"""aplantida_jax: catalog → shards → teachers → distilled student → TF.js, in JAX/Flax."""

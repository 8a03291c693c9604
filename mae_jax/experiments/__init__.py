"""The paper's study as one command (`python -m mae_jax.experiments`): every arm of Kraus et al.
2023 at small scale on one screen, scored the same way; docs/science.md §8."""

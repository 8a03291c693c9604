"""Evaluation of embeddings: batch correction, aggregation, known-relationship recall."""
from mae_jax.util.errors import UserError


class EvalError(UserError, ValueError):
  """Embeddings, tables or options that the evaluation cannot use (a user mistake: one line)."""

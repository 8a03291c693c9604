"""Evaluation of embeddings: batch correction, aggregation, known-relationship recall."""
from mae_jax.util.errors import UserError


class EvalError(UserError, ValueError):
  """Embeddings, tables or options that the evaluation cannot use (a user mistake: one line)."""


def define_embedding_flags(when=""):
  """--pooling, --block, --batch_size, --adabn: how a checkpoint embeds (eval.embed, and
  eval.recall --ckpt with `when` = " (with --ckpt)")."""
  from absl import flags
  flags.DEFINE_enum("pooling", "mean", ["mean", "cls"],
                    f"token pooling{when} (docs/science.md §3.1)")
  flags.DEFINE_integer("block", None, f"encoder block to embed from{when}; default the last")
  flags.DEFINE_integer("batch_size", 32, f"crops per embedding batch, per process{when}")
  flags.DEFINE_bool("adabn", False, f"re-estimate BatchNorm statistics on each experiment's "
                    f"crops{when}: WSL checkpoints (AdaBN; docs/science.md §1.10)")

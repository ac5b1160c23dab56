"""Sub-commands of the ``sparsefw`` CLI beyond train/plugins/describe."""

#: help of ``--trust-checkpoint``, which every command that reads a checkpoint takes
TRUST_HELP = ("load the checkpoint with full unpickling, as torch.load(weights_only=False) "
              "does. UNSAFE: a crafted checkpoint runs arbitrary code; only for files you made")

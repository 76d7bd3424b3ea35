"""Entry point of sense knowledge distillation: ``python -m train.distill`` = ``sense-jax distill``.

The trainer itself (config, pure train step, shardings, Orbax checkpoints, export) is library
code in :mod:`sense_jax.training` (public names in :mod:`sense_jax.trainer`); the command is
:mod:`sense_jax.commands.distill`; this file only runs it.

    python -m train.distill --preset runlocal --set senses=DICT_DIR --set train_data=corpus.txt
    python -m train.distill --config run.yaml --set steps=20000 --set fsdp=true
"""

import sys

from sense_jax.commands.distill import main

if __name__ == "__main__":
    sys.exit(main())

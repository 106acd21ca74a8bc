"""Training (paper Sec. 3.1, 3.4, A.3, D.1, D.2): ``m4v train``, ``train-vae``, ``prepare`` and ``convert``.

Modules: ``config`` (YAML schema), ``objective`` (pyramidal flow matching + temporal pyramid),
``data`` (deterministic step plans and sources), ``trainer`` (loop, FSDP2, checkpoints),
``shards`` (latent shards), ``convert`` (attention -> Mamba), ``reward`` (reward learning),
``vae_training``, ``cli`` (``register(subparsers)``). Import the modules directly; this package
imports nothing heavy on its own.
"""

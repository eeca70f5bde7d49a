"""dpclip inside the training frameworks people already use.

Each module imports its framework, which is an optional extra:

- ``dpclip.integrations.transformers``: ``DPTrainer``, a Hugging Face ``Trainer``
  (``pip install 'dpclip[transformers]'``).

With accelerate no integration module is needed: ``accelerator.backward(loss)``
takes dpclip's loss as it is (see the README).
"""

"""fgtrac inside the trainers people use: each module imports its framework, this package imports nothing.

- ``fgtrac_assets.integrations.lightning``: ``FgtracCallback``, a PyTorch Lightning callback
  (``pip install 'fgtrac[lightning]'``).
- ``fgtrac_assets.integrations.hf``: ``FgtracTrainerCallback`` with ``FgtracTrainerMixin``, for the Hugging
  Face ``transformers.Trainer`` (``pip install 'fgtrac[hf]'``).

Both record what a ``fg.track`` session records (session/run.py): which samples every optimizer step
consumed, its learning rates, the checkpoints, all in one signed commit when training ends.
"""

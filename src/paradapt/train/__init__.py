"""Training adapters on a frozen base: data loading, the loop, and the ``paradapt train`` command."""

"""fastsat: fast adversarial training and the saliency–robustness connection.

Importing fastsat touches no GPU and needs neither triton nor the compiled extension: the ops
fall back to their PyTorch reference (see :func:`fastsat.ops.available_backends`).
"""

__version__ = "0.1.0"

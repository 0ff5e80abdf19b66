import os

import torch

# Without a GPU the Triton kernels run in Triton's CPU interpreter. The variable is read when a
# kernel is decorated, so it must be set before anything imports the kernels.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import atexit
import os
import shutil
import tempfile

# transformers reads these when it is imported: keep trust_remote_code's module copies out of ~/.cache
# (in a folder removed at exit) and never reach for the Hugging Face hub.
if "HF_MODULES_CACHE" not in os.environ:
    os.environ["HF_MODULES_CACHE"] = tempfile.mkdtemp(prefix="hf-modules-")
    atexit.register(shutil.rmtree, os.environ["HF_MODULES_CACHE"], ignore_errors=True)
os.environ.setdefault("HF_HUB_OFFLINE", "1")

"""Model families. Each family module holds an NNX parameter container and the pure functions of its block."""
from jaxedit.models import gpt2, llama

FAMILY_MODULES = {"gpt2": gpt2, "llama": llama}
MODEL_CLASSES = {"gpt2": gpt2.GPT2, "llama": llama.Llama}

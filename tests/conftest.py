"""Shared test fixtures.

Meta's real Llama 2 tokenizer lives in ../shared/llama2/tokenizer.model (beside the repository, as CI lays it out).
Tests that need it take the `meta_tokenizer_path` fixture, which skips with a clear reason where it is absent.
NANOLLAMA2_SHARED overrides where shared/ is.
"""
import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # the scripts are flat top-level modules: `import model`, `import tokenizer`, ...

SHARED = Path(os.environ.get("NANOLLAMA2_SHARED", REPO.parent / "shared"))
META_TOKENIZER = SHARED / "llama2" / "tokenizer.model"


@pytest.fixture(scope="session")
def meta_tokenizer_path() -> Path:
    if not META_TOKENIZER.is_file():
        pytest.skip(f"Meta's tokenizer.model not found at {META_TOKENIZER} (set NANOLLAMA2_SHARED to the shared/ folder)")
    return META_TOKENIZER


@pytest.fixture
def one_thread():
    """Tiny test models (dim 64) run faster on one thread than on several, above all on a shared CPU; torchrun
    processes use one each. Test files that want it say `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    import torch
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny_chat_checkpoint(d: Path) -> Path:
    """A tiny random chat model (dim 64, 2 layers, GQA) and a 400-piece tokenizer trained on a little world text,
    saved in Meta's layout in d: fast enough to generate with in every test that needs a real checkpoint."""
    import model as M
    from tokenizer import B_INST, E_INST, train_tokenizer
    from world import World
    world = World(seed=0)
    chats = [" ".join(f"{B_INST} {u['content']} {E_INST} {a['content']}" for u, a in zip(x[::2], x[1::2]))
             for x in world.sft_dialogs("train", 300, seed=1)]
    tok = train_tokenizer(world.pretrain_documents(200_000) + chats, 400, d / "tok.model")
    args = M.ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=tok.n_words, multiple_of=16,
                       max_seq_len=256)
    M.save_checkpoint(M.Transformer(args).init_weights(seed=0), d, tok.model_path)
    return d

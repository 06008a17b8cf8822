

# ---- exploration patch (GPU experiment only) ----
import os as _os
_orig_load_digits = load_digits_dataset


def load_digits_dataset(size: int = IMAGE_SIZE):
    name = _os.environ.get("EXPLORE_VARIANT")
    if not name:
        return _orig_load_digits(size)
    import sys
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    import explore_teacher as e
    x, y = _orig_load_digits(size)
    return e.VARIANTS[name].draw((x[:, :1] + 1) / 2, torch.Generator().manual_seed(0)) * 2 - 1, y

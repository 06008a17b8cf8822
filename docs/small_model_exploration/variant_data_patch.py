

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
    smin, smax, rot = e.VARIANTS[name][:3]
    spec = e.VARIANTS[name]
    bg, ink = (spec[4], spec[5]) if len(spec) > 4 else ("none", (1.0, 1.0))
    g = torch.Generator().manual_seed(0)
    xs = e.compose(e.place((x[:, :1] + 1) / 2, g, smin, smax, rot), g, bg, ink)
    return xs * 2 - 1, y

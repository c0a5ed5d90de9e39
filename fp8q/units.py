"""Sizes and rates in words, the same in the CLI's tables, its messages and the model card. Imports: nothing."""


def size_text(n: float) -> str:
    """Bytes as GB (decimal, as disks and the Hub count them), MB below a tenth of a GB, kB below a tenth of a MB,
    and bytes below a kB: never "0.00 GB" for a size that is not zero."""
    if n >= 1e8:
        return f"{n / 1e9:.2f} GB"
    if n >= 1e5:
        return f"{n / 1e6:.2f} MB"
    if n >= 1e3:
        return f"{n / 1e3:.1f} kB"
    return f"{int(n)} bytes"


def rate_text(bytes_per_s: float) -> str:
    """A rate in the unit `size_text` would give a second's worth: '1.52 GB/s', '31.7 kB/s'."""
    return f"{size_text(bytes_per_s)}/s".replace(" bytes/s", " B/s")

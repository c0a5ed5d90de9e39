"""Sizes in words, the same in the CLI's tables and the model card. Imports: nothing."""


def size_text(n: int) -> str:
    """Bytes as GB (decimal, as disks and the Hub count them), or MB below a tenth of a GB."""
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.2f} MB"

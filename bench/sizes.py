"""Byte counts for people, shared by the bench scripts."""


def human(n):
    """2176 -> '2 KiB', 1048576 -> '1 MiB'."""
    for unit in ("B", "KiB", "MiB"):
        if n < 1024:
            return f"{n:.0f} {unit}"
        n /= 1024
    return f"{n:.0f} GiB"

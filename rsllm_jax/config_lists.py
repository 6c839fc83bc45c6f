"""Config values that are lists: length buckets, LoRA targets, seeds, filter sizes, the mesh
shape, the jobs, profile steps. On the command line they are comma-separated strings
(`--config.prompts.length_buckets=256,512`); in a config file they may also be a sequence or
one number. Parsed here only, so every field accepts the same spellings and a bad value names
its field. A leaf module: it imports nothing of the package.
"""


def names(value, field):
    """'q, k,v' (or a sequence) → ('q', 'k', 'v'): stripped, empty parts dropped."""
    if isinstance(value, str):
        parts = value.split(",")
    elif isinstance(value, (list, tuple)):
        parts = [str(v) for v in value]
    else:
        raise ValueError(f"{field}={value!r}: expected comma-separated names")
    return tuple(part.strip() for part in parts if part.strip())


def ints(value, field):
    """'256, 384' (or a sequence, or one int) → (256, 384); '' → ()."""
    if isinstance(value, int) and not isinstance(value, bool):
        return (value, )
    try:
        return tuple(int(part) for part in names(value, field))
    except ValueError:
        raise ValueError(f"{field}={value!r}: expected comma-separated integers") from None

"""Actions of examples/shout.yaml; workers need PYTHONPATH=examples RUNCTX_ACTION_MODULES=myacts."""

from tasks.changes import Change


def shout(view, args):
    """Write a variable in capitals (``args.from``, default ``greeting``) and count the shouts."""
    name = args.get("from", "greeting")
    text = view.get(name, "")
    if not text:
        raise ValueError(f"nothing to shout: {name!r} is empty")
    return [
        Change.set("shouted", text.upper() + "!"),
        Change.increment("shouts", 1),  # applied to the value current at commit: concurrent steps both count
        Change.append("said", text),
    ]


def whisper(view, args):
    """A mapping of name -> value is a `set` of each."""
    return {"whispered": view.get("shouted", "").lower()}

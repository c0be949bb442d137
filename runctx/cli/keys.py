"""`runctx keys new | rotate`: the encryption keys of confidential and secret values."""

from __future__ import annotations

import typer

from runctx.cli.base import JSON_OPTION, app, client, echo_json

keys_app = typer.Typer(no_args_is_help=True, rich_markup_mode=None, help="Encryption keys of confidential and secret values.")
app.add_typer(keys_app, name="keys")


@keys_app.command("new")
def keys_new() -> None:
    """Print a fresh key: put it first in RUNCTX_ENCRYPTION_KEYS (keep the old ones after it)."""
    from state.sealing import Keyring

    typer.echo(Keyring.new_entry())


@keys_app.command("rotate")
def keys_rotate(
    batch: int = typer.Option(100, "--batch", min=1, metavar="N", help="Rows sealed again per transaction."),
    as_json: bool = JSON_OPTION,
) -> None:
    """Seal every stored value again under the newest key.

    Runs go on meanwhile; an interrupted rotation resumes when run again.

    First give every worker the new key list (newest first, old keys after it); afterwards the old
    keys may be dropped from it.
    """
    with client() as client_:
        key, counts = client_.rotate_keys(batch=batch)
    if as_json:
        echo_json({"key": key, "l3_resealed": counts["l3"], "l2_resealed": counts["l2"]})
    else:
        typer.echo(f"sealed again under key {key}: {counts['l3']} rows in L3, {counts['l2']} entries in L2")

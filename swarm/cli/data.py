"""`swarm-data`: train a tokenizer, prepare token shards, verify a shard folder.

    swarm-data tokenizer --vocab-size 8192 --out tok.json FILES...
    swarm-data prepare --tokenizer tok.json --out DIR INPUTS...
    swarm-data prepare --stdlib [--config gpt_stdlib]      # build a stdlib run's cached shards
    swarm-data verify DIR/manifest.json

They parse options and call one entry point of `swarm.data`; see docs/training.md "Data".
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

from swarm.cli.logs import setup_logging
from swarm.cli.options import set_option
from swarm.data import Manifest, bind_data, manifest_path, verify_manifest
from swarm.data.inputs import DEFAULT_FIELD, read_documents
from swarm.data.prepare import DEFAULT_SHARD_TOKENS, DEFAULT_VAL_FRACTION, prepare_shards
from swarm.data.stdlib import DEFAULT_MAX_BYTES, stdlib_files
from swarm.data.tokenizer import train_bpe
from swarm.errors import SwarmError
from swarm.run.config import RunConfig

STDLIB_PRESET = "gpt_stdlib"


def _fail(error: SwarmError) -> None:
    click.echo(f"error: {error}", err=True)
    sys.exit(1)


def _inputs(paths: tuple[Path, ...], stdlib: bool, max_bytes: int) -> list[Path]:
    inputs = [*paths, *(stdlib_files(max_bytes) if stdlib else [])]
    if not inputs:
        raise click.UsageError("give input files (or --stdlib)")
    return inputs


def _describe(manifest: Manifest) -> str:
    return (
        f"{manifest.path}: train {manifest.tokens('train')} tokens in {len(manifest.split('train'))} shard(s), "
        f"val {manifest.tokens('val')} tokens, {manifest.dtype}, vocabulary {manifest.vocab_size}; "
        f"manifest sha256 {manifest.sha256}, tokenizer sha256 {manifest.tokenizer_sha256}"
    )


@click.group()
def main() -> None:
    """Tokenizers and token shards for a swarm run."""


_stdlib_option = click.option(
    "--stdlib", is_flag=True, help="Add the Python standard library's own *.py files (sorted, --max-bytes)."
)
_max_bytes_option = click.option(
    "--max-bytes", type=int, default=DEFAULT_MAX_BYTES, show_default=True, help="--stdlib: bytes of source read."
)
_field_option = click.option(
    "--field", default=DEFAULT_FIELD, show_default=True, help="JSONL/Parquet/dataset: the text field."
)


@main.command()
@click.option("--vocab-size", type=int, required=True, help="Tokens in the vocabulary (at most).")
@click.option("--out", "out_path", type=click.Path(dir_okay=False, path_type=Path), required=True)
@click.option("--min-frequency", type=int, default=2, show_default=True, help="Fewest occurrences of a merge.")
@_field_option
@_stdlib_option
@_max_bytes_option
@click.argument("files", nargs=-1, type=click.Path(exists=True, path_type=Path))
def tokenizer(
    vocab_size: int, out_path: Path, min_frequency: int, field: str, stdlib: bool, max_bytes: int, files: tuple[Path]
) -> None:
    """Train a byte-level BPE tokenizer on FILES (text, JSONL, Parquet, saved datasets); write tokenizer.json."""
    try:
        docs = read_documents(_inputs(files, stdlib, max_bytes), field=field)
        tok, sha256 = train_bpe(docs, vocab_size=vocab_size, out=out_path, min_frequency=min_frequency)
    except SwarmError as e:
        _fail(e)
    click.echo(f"wrote {out_path}: vocabulary {tok.get_vocab_size()}, sha256 {sha256}")


@main.command()
@click.option("--tokenizer", "tokenizer_path", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), help="The shard folder.")
@_field_option
@click.option("--val-fraction", type=float, default=DEFAULT_VAL_FRACTION, show_default=True, help="Held out.")
@click.option("--shard-tokens", type=int, default=DEFAULT_SHARD_TOKENS, show_default=True, help="Per shard, at most.")
@_stdlib_option
@_max_bytes_option
@click.option("--config", "config_path", default=None, help=f"--stdlib alone: the run (default {STDLIB_PRESET}).")
@set_option
@click.option("--no-progress", is_flag=True, help="No progress bar.")
@click.argument("inputs", nargs=-1, type=click.Path(exists=True, path_type=Path))
def prepare(
    tokenizer_path: Path | None,
    out_dir: Path | None,
    field: str,
    val_fraction: float,
    shard_tokens: int,
    stdlib: bool,
    max_bytes: int,
    config_path: str | None,
    overrides: tuple[str, ...],
    no_progress: bool,
    inputs: tuple[Path, ...],
) -> None:
    """Tokenize INPUTS into token shards and manifest.json in --out. With --stdlib and neither --tokenizer nor
    --out: build the cached stdlib shards of a `data.source = "stdlib"` run (--config)."""
    setup_logging("INFO")
    try:
        if stdlib and tokenizer_path is None and out_dir is None and not inputs:
            run = bind_data(RunConfig.load(config_path or STDLIB_PRESET, overrides), progress=not no_progress)
            click.echo(_describe(verify_manifest(manifest_path(run))))
            click.echo(f"run id {run.run_id}")
            return
        if tokenizer_path is None or out_dir is None:
            raise click.UsageError("give --tokenizer and --out (or --stdlib alone, for a stdlib run's cache)")
        manifest = prepare_shards(
            _inputs(inputs, stdlib, max_bytes),
            tokenizer_path=tokenizer_path,
            out_dir=out_dir,
            field=field,
            val_fraction=val_fraction,
            shard_tokens=shard_tokens,
            progress=not no_progress,
        )
    except SwarmError as e:
        _fail(e)
    click.echo(_describe(manifest))


@main.command()
@click.argument("manifest", type=click.Path(dir_okay=False, path_type=Path))
def verify(manifest: Path) -> None:
    """Check a shard folder: the manifest, its tokenizer, and every shard's size and SHA-256."""
    try:
        click.echo(_describe(verify_manifest(manifest)))
    except SwarmError as e:
        _fail(e)


if __name__ == "__main__":
    main()

"""Search your own photos by text with a BLIP retrieval model: build an index, query it, serve a web page.

    python search.py index --config CFG --checkpoint SRC --images DIR --index OUT [--options key=value ...]
    torchrun --nproc_per_node=8 search.py index ...        (the images to embed are sharded across processes)
    python search.py query --index OUT "a dog on a beach" [--top N] [--rerank-k K] [--itc-only] [--json]
    python search.py query --index OUT --image PATH [--top N] [--json]       (image -> image, by ITC)
    python search.py serve --index OUT [--host 127.0.0.1] [--port 8000] [--allowed-host NAME ...]

`index` embeds every image under DIR (recursively) and stores the ITC features, paths and model identity in OUT;
run again, it embeds only new or changed files and drops deleted ones, and it resumes an interrupted run.
`query` and `serve` rebuild the model from OUT/config.yaml and the recorded checkpoint (or --checkpoint) and
refuse it if its weights differ from the ones that built the index. Text queries take the ITC top K and re-rank
them by ITM match logit + cosine, the score of the evaluation (engine/search_query.py).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys

from configs.schema import load_config
from engine.search_index import SearchIndex, build_index, read_manifest
from engine.search_query import Searcher
from engine.search_server import make_server
from models.checkpoint import add_unsafe_trust_flag, apply_config_updates
from models.loading import load_model
from utils import UserError, init_distributed, is_main_process, log, run_cli


def _port(value: str) -> int:
    try:
        port = int(value)
    except ValueError:
        port = -1
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"expected a port number in 0..65535 (0: any free port), got {value!r}")
    return port


def _options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--options", nargs="+", default=[], metavar="KEY=VALUE", help="override config keys")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("index", help="build or update an index of a folder of images")
    p.add_argument("--config", required=True, help="YAML config of the model (e.g. configs/retrieval_coco.yaml)")
    p.add_argument("--checkpoint", default=None, help="official .pth, URL, HF directory or ours; default: `pretrained`")
    p.add_argument("--images", required=True, help="folder of images, searched recursively")
    p.add_argument("--index", required=True, help="index folder (created if missing)")
    add_unsafe_trust_flag(p)  # index only: query and serve read the index's recorded checkpoint, always safely
    _options(p)
    for name, helptext in (("query", "search the index"), ("serve", "web page and JSON API")):
        p = sub.add_parser(name, help=helptext)
        p.add_argument("--index", required=True, help="index folder built by `search.py index`")
        p.add_argument("--checkpoint", default=None, help="default: the checkpoint that built the index")
        _options(p)
        if name == "query":
            p.add_argument("text", nargs="?", default=None, help="what to look for")
            p.add_argument("--image", default=None, help="query by this image file instead (ITC, image -> image)")
            p.add_argument("--top", type=int, default=10, help="results to print (default 10)")
            p.add_argument("--rerank-k", type=int, default=None, help="ITC shortlist re-ranked by ITM; default k_test")
            p.add_argument("--itc-only", action="store_true", help="rank by ITC cosine only, no re-ranking")
            p.add_argument("--json", action="store_true", help="print the results as JSON")
        else:
            p.add_argument("--host", default="127.0.0.1", help="default loopback; 0.0.0.0 exposes your photos")
            p.add_argument("--port", type=_port, default=8000, help="0..65535 (default 8000; 0: any free port)")
            p.add_argument(
                "--allowed-host",
                action="append",
                default=[],
                metavar="NAME",
                help="also accept requests whose Host header names NAME (repeatable); by default only loopback "
                "names (localhost, 127.0.0.1, [::1]) and --host itself are accepted, against DNS rebinding",
            )
    args = parser.parse_args(argv)
    if args.command == "query":
        if (args.text is None) == (args.image is None):
            parser.error("query: give either a text or --image PATH")
        if args.text is not None and not args.text.strip():
            parser.error("query: empty text; pass some words, e.g. search.py query --index OUT 'a red circle'")
        if args.top < 1 or (args.rerank_k is not None and args.rerank_k < 1):
            parser.error("query: --top and --rerank-k must be >= 1")
    return args


def run_index(args: argparse.Namespace) -> None:
    config = load_config(args.config, args.options, script="search.py")
    dist_info = init_distributed(config["device"])
    source = args.checkpoint if args.checkpoint is not None else config["pretrained"]
    if not source:
        raise UserError("index: no --checkpoint and no `pretrained` in the config; an index needs a trained model")
    model, report = load_model(config, source, allow_unsafe=args.unsafe_trust_checkpoint)
    apply_config_updates(config, report)
    stats = build_index(model.to(dist_info.device), config, source, args.images, args.index, dist_info.device)
    if is_main_process():
        for line in stats.skipped + stats.unreadable:
            print(f"skipped: {line}")
        print(
            f"index {args.index}: {stats.total} images ({stats.new} new, {stats.changed} changed, {stats.deleted} "
            f"deleted, {stats.unchanged} unchanged, {stats.resumed} resumed); {len(stats.unreadable)} unreadable"
        )


def load_searcher(args: argparse.Namespace) -> Searcher:
    """Model and index for query/serve: OUT/config.yaml (+ --options), the recorded or given checkpoint."""
    manifest = read_manifest(args.index)
    index = SearchIndex.load(args.index)  # raises the "no index here" message when manifest is None
    config = load_config(os.path.join(args.index, "config.yaml"), args.options, script="search.py")
    source = args.checkpoint if args.checkpoint is not None else manifest["model"]["checkpoint"]
    device = init_distributed(config["device"]).device
    model, report = load_model(config, source)  # never allow_unsafe: an index folder may come from anyone
    apply_config_updates(config, report)
    return Searcher(model.to(device), index, config, device)


def run_query(args: argparse.Namespace) -> None:
    with contextlib.redirect_stdout(sys.stderr) if args.json else contextlib.nullcontext():
        searcher = load_searcher(args)  # the checkpoint report goes to stderr when stdout is JSON
    if args.image is not None:
        result = searcher.search_image(args.image, top=args.top)
    else:
        result = searcher.search_text(args.text, top=args.top, rerank_k=args.rerank_k, rerank=not args.itc_only)
    root = searcher.index.image_root
    if args.json:
        payload = {"query": args.text if args.image is None else {"image": args.image}, "image_root": root}
        payload.update(result.as_dict())
        for hit in payload["results"]:
            hit["file"] = os.path.join(root, hit["path"])
        print(json.dumps(payload, indent=1))
        return
    for path in result.missing:
        print(f"note: {path} could not be read any more; left out", file=sys.stderr)
    how = {"rerank": f"ITC top {result.rerank_k} re-ranked by ITM", "itc": "ITC only", "image": "image -> image ITC"}
    print(f"{len(result.hits)} of {len(searcher.index)} images, {how[result.mode]}:")
    print(f"{'rank':>4}  {'score':>8}  {'cosine':>7}  {'itm':>7}  path")
    for rank, hit in enumerate(result.hits, 1):
        itm = f"{hit.itm:7.3f}" if hit.itm is not None else f"{'-':>7}"
        print(f"{rank:4d}  {hit.score:8.3f}  {hit.cosine:7.3f}  {itm}  {os.path.join(root, hit.path)}")


def run_serve(args: argparse.Namespace) -> None:
    searcher = load_searcher(args)
    try:
        server = make_server(searcher, args.host, args.port, allowed_hosts=args.allowed_host)
    except OSError as err:  # port in use, an address this machine does not have, a privileged port
        raise UserError(
            f"serve: cannot listen on {args.host}:{args.port}: {err.strerror or err} "
            f"(another program may be using the port: choose another with --port, or 0 for any free port)"
        ) from None
    host, port = server.server_address[:2]
    if host not in ("127.0.0.1", "::1", "localhost"):
        log(f"warning: listening on {host}: anyone who can reach this machine can search and view these photos")
        log(f"accepting requests for the host names {sorted(server.allowed_hosts)} (add more with --allowed-host)")
    log(
        f"serving {len(searcher.index)} images from {searcher.index.image_root} at http://{host}:{port}/ (Ctrl-C stops)"
    )
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    {"index": run_index, "query": run_query, "serve": run_serve}[args.command](args)


if __name__ == "__main__":
    run_cli(main)

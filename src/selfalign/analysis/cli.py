"""``selfalign analyze ...``: figures (PNG) plus one section each in an HTML report (default ANALYSIS/report.html)."""

from __future__ import annotations

import argparse
import shlex
from pathlib import Path

from selfalign import atomic
from selfalign.errors import InputError


def _command_line(args: argparse.Namespace) -> str:
    """The command that reproduces this invocation, every option spelled out (defaults included)."""
    parts = ["selfalign", "analyze", args.analysis]
    for action in args._parser._actions:
        if action.dest in ("help", "func", "_parser"):
            continue
        value = getattr(args, action.dest, None)
        if not action.option_strings:
            parts += [str(v) for v in value] if isinstance(value, list) else [str(value)]
        elif action.nargs == 0:
            parts += [action.option_strings[-1]] if value else []
        elif value is not None and value != []:
            values = value if isinstance(value, list) else [value]
            parts += [action.option_strings[-1]] + [str(v) for v in values]
    return shlex.join(parts)


def _report(args) -> Path:
    return Path(args.report) if args.report else Path(args.out) / "report.html"


def _section(args, section_id: str, title: str, body: str, figures: list[Path]) -> None:
    from selfalign.analysis.common import safe_name
    from selfalign.analysis.report import update_section

    path = update_section(_report(args), safe_name(section_id), title, _command_line(args), body, figures,
                          embed=args.embed)
    print(f"figures: {', '.join(str(f) for f in figures)}\nreport section '{safe_name(section_id)}' -> {path}")


def _load(args, run_dir: str):
    from selfalign.analysis.common import load_run_split

    return load_run_split(run_dir, args.split, args.device, features=args.features, root=args.root)


def _cmd_correspondences(args) -> None:
    from selfalign.analysis.correspondence import figure_name, pair_figure
    from selfalign.analysis.report import table_html

    rs = _load(args, args.run_dir)
    index = args.index if args.index is not None else rs.image_index(args.image)
    if not 0 <= index < rs.split.num_images:
        raise InputError(f"--index {index}: split '{args.split}' has {rs.split.num_images} images (0..N-1)")
    path, info = pair_figure(rs, index, args.caption, args.top, Path(args.out) / "figures" / figure_name(
        rs, index, args.caption))
    rows = [[i + 1, p["word"], p["region"], p["cosine"]] for i, p in enumerate(info["pairs"])]
    for row in rows:
        print(f"  {row[0]}. {row[1]:<14} region {row[2]:<3} cosine {row[3]:.3f}")
    body = (f"<p>{rs.label}, image <code>{info['image_id']}</code>, caption {args.caption}: "
            f"“{info['caption']}”</p>" + table_html(["rank", "word", "region", "cosine"], rows))
    _section(args, f"correspondences-{rs.run_dir.name}-{args.split}-{info['image_id']}-c{args.caption}",
             f"Word–region correspondences: {info['image_id']}", body, [path])


def _cmd_accuracy(args) -> None:
    from selfalign.analysis.correspondence import accuracy_figure, correspondence_accuracy, format_table, table_rows
    from selfalign.analysis.report import table_html

    results = [correspondence_accuracy(_load(args, run)) for run in args.run_dirs]
    print(format_table(results))
    out = Path(args.out)
    json_path = Path(args.json) if args.json else out / f"correspondence_accuracy_{args.split}.json"
    atomic.write_json(json_path, {"split": args.split, "runs": results})
    figure = accuracy_figure(results, out / "figures" / f"correspondence_accuracy_{args.split}.png")
    body = ("<p>Fraction of colour and shape words whose best region (argmax cosine of the context-free locals over "
            "the image's valid regions, region 0 = whole image excluded) is the object they name. Mentions that do "
            f"not map to a model token are skipped and counted. JSON: <code>{json_path}</code></p>"
            + table_html(["metric"] + [r["label"] for r in results], table_rows(results)))
    _section(args, f"correspondence-accuracy-{args.split}", f"Correspondence accuracy ({args.split})", body, [figure])


def _cmd_codebook(args) -> None:
    from selfalign.analysis.codebook import analyse_codebook
    from selfalign.analysis.common import safe_name
    from selfalign.analysis.report import table_html

    rs = _load(args, args.run_dir)
    summary = analyse_codebook(rs, Path(args.out) / "figures", args.top, args.words, args.crops)
    json_path = Path(args.out) / f"codebook_{safe_name(rs.run_dir.name)}_{args.split}.json"
    atomic.write_json(json_path, summary)
    k = summary["codebook_size"]
    rows = [[name, u["assigned"], u["used"], u["dead"], u["perplexity"]]
            for name, u in (("words", summary["words"]), ("regions", summary["regions"]))]
    for row in rows:
        print(f"  {row[0]:<8} assigned {row[1]:>7}  used {row[2]:>5}/{k}  dead {row[3]:>5}  perplexity {row[4]:.1f}")
    print(f"  codes used by both words and regions: {summary['codes_used_by_both']}")
    t = summary["region_targets"]
    print(f"  region targets (Sinkhorn codes): entropy {t['mean_entropy']:.3f} nats (uniform: ln K = {t['uniform']:.3f});"
          f" best prototype cosine {t['mean_best_cosine']:.3f}")
    concepts = [[c["concept"], c["n_words"], c["n_regions"], ", ".join(f"{w} ×{n}" for w, n in c["words"])]
                for c in summary["top_concepts"]]
    body = (f"<p>{rs.label}, {args.split} split, K = {k}. Perplexity = exp(entropy of the usage distribution), at "
            f"most K; dead = codes no word (or region) of this split is assigned to. Codes used by both modalities: "
            f"{summary['codes_used_by_both']}. LCA's targets for this split's regions (Sinkhorn codes over blocks of "
            f"1,024 regions): mean entropy {summary['region_targets']['mean_entropy']:.3f} nats against "
            f"ln K = {summary['region_targets']['uniform']:.3f} for uniform codes (near ln K: the words have "
            f"nothing to learn); mean best prototype cosine {summary['region_targets']['mean_best_cosine']:.3f}. "
            f"JSON: <code>{json_path}</code></p>"
            + table_html(["modality", "assigned", "codes used", "dead codes", "perplexity"], rows)
            + table_html(["concept", "words", "regions", "commonest words"], concepts))
    _section(args, f"codebook-{rs.run_dir.name}-{args.split}", f"Concept codebook: {rs.label}", body,
             [Path(f) for f in summary["figures"]])


def _cmd_sweep(args) -> None:
    from selfalign.analysis.common import safe_name
    from selfalign.analysis.report import table_html
    from selfalign.analysis.sweep import load_results, loss_figure, markdown_table, rsum_figure, summarise

    data = load_results(args.results)
    stem = safe_name(args.name or Path(args.results).resolve().parent.name)
    figures = Path(args.out) / "figures"
    pngs = [rsum_figure(data, figures / f"sweep_{stem}_rsum.png")]
    if any(r.get("log") for r in data["runs"]):
        pngs.append(loss_figure(data, figures / f"sweep_{stem}_curves.png"))
    table = markdown_table(data)
    atomic.write_text(Path(args.out) / f"sweep_{stem}.md", table)
    print(table, end="")
    rows = [[r["dataset"], r["variant"], f"{r['rsum_mean']:.1f} ± {r['rsum_std']:.1f}", len(r["seeds"])]
            for r in summarise(data)]
    body = (f"<p>Results: <code>{args.results}</code>; made by <code>{data.get('command', '?')}</code></p>"
            + table_html(["dataset", data.get("variant_name", "variant"), "test rsum", "seeds"], rows))
    _section(args, f"sweep-{stem}", f"Sweep over {data.get('variant_name', 'variant')} ({stem})", body, pngs)


def _cmd_curves(args) -> None:
    from selfalign.analysis.common import safe_name
    from selfalign.analysis.curves import curves_figure, curves_summary, read_log
    from selfalign.analysis.report import table_html

    runs = [(Path(r).name, read_log(r)) for r in args.run_dirs]
    stem = safe_name("_".join(name for name, _ in runs))[:80]
    figure = curves_figure(runs, Path(args.out) / "figures" / f"curves_{stem}.png")
    rows = curves_summary(runs)
    for row in rows:
        print(f"  {row[0]}: {row[1]} epochs, final loss {row[2]}, best dev rsum {row[3]} (epoch {row[4]})")
    body = table_html(["run", "epochs", "final loss (sum of parts)", "best dev rsum", "at epoch"], rows)
    _section(args, f"curves-{stem}", "Training curves", body, [figure])


def _cmd_examples(args) -> None:
    from selfalign.analysis.common import safe_name
    from selfalign.analysis.curves import default_queries, examples_figure, retrieve

    rs = _load(args, args.run_dir)
    queries = args.queries or default_queries(rs, args.n)
    results = retrieve(rs, queries, args.k)
    for r in results:
        marks = " ".join(f"{h['image_id']}{'*' if h['correct'] else ''}" for h in r["top"])
        print(f"  {r['query']!r} -> {marks}")
    stem = f"examples_{safe_name(rs.run_dir.name)}_{args.split}"
    figure = examples_figure(rs, results, Path(args.out) / "figures" / f"{stem}.png")
    atomic.write_json(Path(args.out) / f"{stem}.json", {"run_dir": str(rs.run_dir), "queries": results})
    body = "<p>A green frame marks a correct image (one of whose captions is the query, word for word).</p>"
    _section(args, f"examples-{rs.run_dir.name}-{args.split}", f"Retrieval examples: {rs.label}", body, [figure])


def _outputs(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="analysis", help="folder for figures and JSON (default: analysis)")
    p.add_argument("--report", help="the HTML report to add a section to (default: OUT/report.html)")
    p.add_argument("--embed", action="store_true", help="embed figures in the report as base64")


def _run_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--split", default="test")
    p.add_argument("--device", default="cpu")
    p.add_argument("--features", help="feature store (default: data.features of the run config)")
    p.add_argument("--root", help="dataset folder with images/ (default: data.root of the run config)")
    _outputs(p)


def register(subparsers) -> None:
    """Add ``analyze`` and its sub-commands to the ``selfalign`` parser."""
    top = subparsers.add_parser("analyze", help="figures + HTML report: what a trained run learned")
    sub = top.add_subparsers(dest="analysis", required=True)

    def add(name: str, func, help_text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text)
        p.set_defaults(func=func, _parser=p)
        return p

    p = add("correspondences", _cmd_correspondences, "top word–region pairs of one image–caption pair")
    p.add_argument("run_dir")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--image", help="image id")
    which.add_argument("--index", type=int, help="image index in the split")
    p.add_argument("--caption", type=int, default=0, help="which of the image's 5 captions (0..4)")
    p.add_argument("--top", type=int, default=5)
    _run_options(p)

    p = add("correspondence-accuracy", _cmd_accuracy, "scenes: do colour/shape words pick their object's region?")
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    p.add_argument("--json", help="where to write the results (default: OUT/correspondence_accuracy_SPLIT.json)")
    _run_options(p)

    p = add("codebook", _cmd_codebook, "concept codebook: usage, perplexity, dead codes, top concepts")
    p.add_argument("run_dir")
    p.add_argument("--top", type=int, default=8, help="concepts to show")
    p.add_argument("--words", type=int, default=6, help="words listed per concept")
    p.add_argument("--crops", type=int, default=6, help="region crops per concept")
    _run_options(p)

    p = add("sweep", _cmd_sweep, "plots and table of a sweep's results.json (codebook size, POS ablation)")
    p.add_argument("results", metavar="RESULTS.json")
    p.add_argument("--name", help="section / file name (default: the results folder's name)")
    _outputs(p)

    p = add("curves", _cmd_curves, "loss parts and dev rsum per epoch from runs' log.csv")
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    _outputs(p)

    p = add("examples", _cmd_examples, "top-k images for text queries, correct ones framed green")
    p.add_argument("run_dir")
    p.add_argument("--queries", nargs="+", help="query texts (default: --n captions of the split)")
    p.add_argument("--n", type=int, default=4, help="number of split captions used as queries")
    p.add_argument("--k", type=int, default=5, help="images shown per query")
    _run_options(p)

"""`metatransfer`: the pipeline, registry actions, serving and UIs from the command line.

    metatransfer run      [--stage S ...] [--prefect] [--force]
    metatransfer report
    metatransfer ui       {mlflow,prefect,report} [--port P] [--open]
    metatransfer promote  [--target T ...] [--margin M] [--confidence C] [--n-folds N] [--baseline METHOD]
    metatransfer promote  --target T --force --reason "..."
    metatransfer rollback --target T
    metatransfer status   [--target T ...] [--json]
    metatransfer serve    --target T [--model target|learner] [--alias champion] [--port 5001] [--max-body-mb MB]

Every command works on the project in `--root` (default: the current
folder: params.yaml, data/prepared, models/target and the MLflow store
`mlflow.db`, or $MLFLOW_TRACKING_URI). Exit codes: 0 done (a rejected
challenger, or an unlabelled target's `needs_review` that waits for a
person's `--force --reason`, is a done promotion), 1 an error meant for people (message
printed, no traceback), 2 bad usage.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import warnings
from pathlib import Path
from typing import Any

from metatransfer.errors import MetatransferError, environment_error

EXIT_OK, EXIT_USER, EXIT_USAGE = 0, 1, 2

# Telemetry off and no progress bars in what this command starts or imports.
TOOL_ENV = {
    "DO_NOT_TRACK": "true",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
    # With an http:// tracking server MLflow prints "View run ... at: <url>" to stdout at each
    # run's end, which would corrupt `--json` answers (tests/integration/test_tracking_server.py).
    "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true",
}


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand."""
    parser = argparse.ArgumentParser(
        prog="metatransfer",
        description="Run the pipeline, promote/roll back/serve models and open the UIs of a metatransfer project.",
    )
    parser.add_argument("--root", default=".", help="project root holding params.yaml (default: .)")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at DEBUG level")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    run = sub.add_parser("run", help="run the pipeline (all stages, or some) with dvc repro or the Prefect flow",
                         description="Reproduce the pipeline: `dvc repro` (default) runs what changed; --prefect runs "
                                     "the Prefect `pipeline` flow instead (same stages, same dvc.lock, plus promotion). "
                                     "Exit code 0 when every stage succeeded, 1 otherwise.")
    run.add_argument("--stage", action="append", choices=["fetch", "prepare", "episodes", "pretrain", "meta_train", "finetune", "evaluate"],
                     help="stage to reproduce with its upstream stages (repeatable; default: all)")
    run.add_argument("--prefect", action="store_true", help="run the Prefect `pipeline` flow (all stages)")
    run.add_argument("--force", action="store_true", help="re-run even if nothing changed")

    rep = sub.add_parser("report", help="build reports/index.html from the latest metrics, plots and models",
                         description="Build the self-contained HTML report (tables with CIs, plots, data and model "
                                     "versions, the promotion decision) and print its path.")
    rep.add_argument("--params", default="params.yaml", help="params file relative to --root (default: params.yaml)")

    ui = sub.add_parser("ui", help="start the MLflow or Prefect UI on loopback, or open the report",
                        description="Start `mlflow server` on the project store or `prefect server start` on "
                                    "127.0.0.1 and print the URL (Ctrl-C stops it); `report` builds and opens the report.")
    ui.add_argument("kind", choices=["mlflow", "prefect", "report"], help="which UI")
    ui.add_argument("--port", type=int, help="port (default: a free one)")
    ui.add_argument("--open", action="store_true", help="open it in the default browser")

    p = sub.add_parser("promote", help="run the promotion gate: challenger vs champion (or the baseline)",
                       description="Evaluate each target's `challenger` and current `champion` (or, with no champion, "
                                   "the target model fine-tuned from the baseline method) on the same held-out test folds "
                                   "of the target test split; move `champion` to the challenger only if the mean gain is "
                                   ">= margin and the paired confidence interval of the per-fold difference excludes 0. "
                                   "Unset flags come from params.yaml's `promote` section. When the challenger is the "
                                   "baseline method itself and there is no champion, it is compared with the next-best "
                                   "method instead. --force --reason moves `champion` to the challenger without the gate "
                                   "(logged with the reason).")
    p.add_argument("--target", action="append", help="target dataset (repeatable; default: finetune.targets)")
    p.add_argument("--margin", type=float, help="minimum mean accuracy gain (e.g. 0.01)")
    p.add_argument("--confidence", type=float, help="level of the paired interval (e.g. 0.95)")
    p.add_argument("--n-folds", type=int, help="disjoint held-out test folds cut from the test split")
    p.add_argument("--n-episodes", type=int, help=argparse.SUPPRESS)  # renamed to --n-folds: refused, saying so
    p.add_argument("--baseline", help="finetune method a first champion must beat (e.g. scratch)")
    p.add_argument("--force", action="store_true",
                   help="promote the challenger of each --target WITHOUT the gate (needs --target and --reason)")
    p.add_argument("--reason", help="why the gate is overridden (required with --force; logged to MLflow and "
                                    "reports/promotion.json)")
    p.add_argument("--json", action="store_true", help="print the results as JSON")

    r = sub.add_parser("rollback", help="move `champion` back to the previous champion",
                       description="Move the `champion` alias of a target's model (and its learner) back to the previous "
                                   "champion recorded in the registered model's `champion_history` tag.")
    r.add_argument("--target", required=True, help="target dataset")
    r.add_argument("--json", action="store_true", help="print the result as JSON")

    s = sub.add_parser("status", help="aliases, champion history and versions of the registered models",
                       description="Show aliases, champion history and versions of each target's registered models.")
    s.add_argument("--target", action="append", help="target dataset (repeatable; default: finetune.targets)")
    s.add_argument("--json", action="store_true", help="print as JSON")

    v = sub.add_parser("serve", help="serve models:/NAME@ALIAS over HTTP on loopback (MLflow's scoring protocol)",
                       description="Serve the version behind models:/NAME@ALIAS with MLflow's scoring app: the model is "
                                   "downloaded, its folder checked (no code but this installed package's can run) and "
                                   "loaded; request bodies over --max-body-mb get 413. POST {\"inputs\": ...} (float images "
                                   "in [0, 1]), or image files (an image/png or image/jpeg body, or multipart "
                                   "-F image=@scan.png: the target model applies prepare's own preprocessing) to "
                                   "http://HOST:PORT/invocations.")
    v.add_argument("--target", required=True, help="target dataset")
    v.add_argument("--model", choices=["target", "learner"], default="target",
                   help="target: images -> classes; learner: support + query -> query classes (default: target)")
    v.add_argument("--alias", default="champion", help="registry alias to serve (default: champion)")
    v.add_argument("--host", default="127.0.0.1", help="interface to bind (default: 127.0.0.1, loopback only)")
    v.add_argument("--port", type=int, default=5001, help="port (default: 5001)")
    v.add_argument("--max-body-mb", type=float,
                   help="largest request body in MB (default: 128 images of the model's input shape as JSON, "
                        "1-64 MB)")
    v.add_argument("--dry-run", action="store_true", help="print what would be served, do not start")
    return parser


def _print(data: Any, as_json: bool, text: str) -> None:
    print(json.dumps(data, indent=2, sort_keys=True, default=str) if as_json else text)


def cmd_promote(args: argparse.Namespace, root: Path) -> int:
    """`promote`: gate every requested target (or, with --force, promote without the gate); one line (or JSON) each."""
    from metatransfer import registry
    from metatransfer.config import load_params

    if args.n_episodes is not None:
        print("metatransfer promote: --n-episodes was renamed to --n-folds (disjoint held-out test folds of the "
              "target test split, not N-way K-shot episodes)", file=sys.stderr)
        return EXIT_USAGE
    if args.force or args.reason is not None:
        gate_flags = [f for f, v in (("--margin", args.margin), ("--confidence", args.confidence),
                                     ("--n-folds", args.n_folds), ("--baseline", args.baseline)) if v is not None]
        problem = ("--reason is only for --force" if not args.force
                   else "--force needs --reason \"...\" (why the gate is overridden)" if not (args.reason or "").strip()
                   else "--force needs --target (each target promoted deliberately)" if not args.target
                   else f"--force skips the gate: drop {', '.join(gate_flags)}" if gate_flags else "")
        if problem:
            print(f"metatransfer promote: {problem}", file=sys.stderr)
            return EXIT_USAGE
        results = [registry.force_promote(root, t, args.reason) for t in args.target]
    else:
        settings = registry.gate_settings(load_params(root / "params.yaml"), margin=args.margin,
                                          confidence=args.confidence, n_folds=args.n_folds,
                                          baseline=args.baseline)
        results = registry.promote_targets(root, args.target, settings)
    lines = [f"{r.name}: {r.decision}{' (forced, without the gate)' if r.forced else ''} (challenger v{r.challenger} "
             f"vs {r.reference}; champion now {'v' + r.champion_after if r.champion_after else 'none'}): {r.reason}"
             for r in results]
    _print([r.to_dict() for r in results], args.json, "\n".join(lines))
    return EXIT_OK


def cmd_rollback(args: argparse.Namespace, root: Path) -> int:
    """`rollback`: champion back to the previous champion."""
    from metatransfer import registry

    r = registry.rollback(root, args.target)
    _print(r.to_dict(), args.json, f"{r.name}: champion rolled back from v{r.from_version} to v{r.to_version}")
    return EXIT_OK


def cmd_status(args: argparse.Namespace, root: Path) -> int:
    """`status`: aliases, history and versions per registered model."""
    from metatransfer import registry

    status = registry.registry_status(root, args.target)
    lines = []
    for target, models in status.items():
        for name, info in models.items():
            if info is None:
                lines.append(f"{name}: not registered")
                continue
            aliases = ", ".join(f"{a}=v{v}" for a, v in sorted(info["aliases"].items())) or "no aliases"
            history = ",".join(info["history"]) or "-"
            lines.append(f"{name}: {aliases}; champion history {history}")
            for mv in info["versions"]:
                extra = " ".join(x for x in (mv["gate_decision"], "rolled back" if mv["rolled_back"] else "") if x)
                lines.append(f"  v{mv['version']:<4} {mv['method']:<12} {','.join(mv['aliases']):<22} {extra}")
    _print(status, args.json, "\n".join(lines))
    return EXIT_OK


def cmd_serve(args: argparse.Namespace, root: Path) -> int:
    """`serve`: check and load the registered version behind the alias, then serve it until Ctrl-C."""
    import tempfile

    from metatransfer import registry, tracking
    from metatransfer.serving import server

    if not 0 < args.port < 65536:
        raise MetatransferError(f"--port: must be in 1..65535, found {args.port}")
    if args.max_body_mb is not None and not 0 < args.max_body_mb <= 4096:
        raise MetatransferError(f"--max-body-mb: must be in (0, 4096], found {args.max_body_mb}")
    name = registry.model_name(args.target) if args.model == "target" else registry.learner_name(args.target)
    uri = tracking.tracking_uri(root)
    if args.dry_run:
        print(f"serve models:/{name}@{args.alias} on http://{args.host}:{args.port}")
        print(f"MLFLOW_TRACKING_URI={uri}")
        return EXIT_OK
    # Fail here with a clear message rather than in the server's start-up log.
    version = registry.alias_version(registry.client_for(root), name, args.alias)
    if version is None:
        raise registry.RegistryError(f"{name}@{args.alias}: no such registered model version in {uri}; "
                                     "see `metatransfer status`")
    limit = int(args.max_body_mb * 1_000_000) if args.max_body_mb else None
    logging.getLogger("metatransfer").info("models:/%s@%s is version %s", name, args.alias, version.version)
    with tempfile.TemporaryDirectory(prefix="metatransfer-serve-") as tmp:
        server.serve(f"models:/{name}/{version.version}", args.host, args.port, tmp, limit)
    return EXIT_OK


def cmd_run(args: argparse.Namespace, root: Path) -> int:
    """`run`: `dvc repro [stages]` or the Prefect `pipeline` flow, in `root`; streams their output."""
    import subprocess

    env = dict(os.environ, **TOOL_ENV)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    if args.prefect:
        if args.stage:
            print("metatransfer run: --prefect runs every stage; drop --stage or use dvc", file=sys.stderr)
            return EXIT_USAGE
        # flows.pipeline's entry claims the workspace before Prefect starts (one-line refusal when busy)
        cmd = [sys.executable, "-m", "flows.pipeline", *(["--force"] if args.force else [])]
    else:
        cmd = [sys.executable, "-m", "dvc", "repro", *(["--force"] if args.force else []), *(args.stage or [])]
    return EXIT_OK if subprocess.run(cmd, cwd=root, env=env).returncode == 0 else EXIT_USER


def cmd_report(args: argparse.Namespace, root: Path) -> int:
    """`report`: build reports/index.html and print its path."""
    from metatransfer.config import load_params
    from metatransfer.report import build_report

    print(build_report(root, load_params(root / args.params)))
    return EXIT_OK


def cmd_ui(args: argparse.Namespace, root: Path) -> int:
    """`ui`: serve a UI until Ctrl-C (or build and open the report)."""
    from metatransfer.report import run_ui

    return run_ui(args.kind, port=args.port, root=root, open_browser=args.open)


COMMANDS = {"run": cmd_run, "report": cmd_report, "ui": cmd_ui, "promote": cmd_promote, "rollback": cmd_rollback, "status": cmd_status, "serve": cmd_serve}


def main(argv: list[str] | None = None) -> int:
    """Entry of the `metatransfer` command. Returns the exit code (0 ok, 1 user error, 2 usage)."""
    for key, value in TOOL_ENV.items():
        os.environ.setdefault(key, value)
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse exits 2 on bad usage, 0 on --help
        return int(exc.code or 0)
    # MLflow's advice to models-from-code authors, repeated at every model load: noise for users.
    warnings.filterwarnings("ignore", message=r".*Add type hints to the `predict` method")
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    for noisy in ("alembic", "mlflow", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    root = Path(args.root).resolve()
    if not (root / "params.yaml").is_file():
        print(f"metatransfer: {root / 'params.yaml'} not found; run from the project root or pass --root",
              file=sys.stderr)
        return EXIT_USER
    try:
        return COMMANDS[args.command](args, root)
    except MetatransferError as exc:
        print(f"metatransfer {args.command}: {exc}", file=sys.stderr)
        return EXIT_USER
    except Exception as exc:
        # A full disk, refused credentials, an unreachable server: one line, not a traceback.
        line = environment_error(exc)
        if line is None:
            raise
        print(f"metatransfer {args.command}: {line}", file=sys.stderr)
        return EXIT_USER


if __name__ == "__main__":
    sys.exit(main())

"""``sparsefw analyze RUN_DIR``: loss-surface sharpness of a run at its checkpoint.

Writes ``landscape_1d.png``, ``landscape_contour.png``, ``landscape_surface.png`` and
``analysis.json`` (loss, top Hessian eigenvalue over the active weights, roughness coefficients)
into ``RUN_DIR/analysis/``. See ``docs/diagnostics.md``.
"""

from __future__ import annotations

from sparsefw.commands import TRUST_HELP


def cmd_analyze(args) -> int:
    from sparsefw.diagnostics.run import analyze_run

    result = analyze_run(
        args.run_dir, out=args.out, points=args.points, radius=args.radius,
        batches=args.batches, iters=args.iters, tol=args.tol, seed=args.seed,
        plots=not args.no_plots, device=args.device, trust=args.trust_checkpoint,
    )
    r = result["roughness"]
    out = args.out or f"{args.run_dir}/analysis"
    print(f"analysis written to {out}")
    print(f"loss {result['loss']:.5f}  density {result['density']:.4f}  "
          f"top eigenvalue {result['top_eigenvalue']:.5g} "
          f"({result['eigen_iterations']} iterations"
          f"{'' if result['eigen_converged'] else ', not converged'})")
    print(f"roughness: Ra(plane) {r['ra_plane']:.5g}  Ra(quadratic) {r['ra_quadratic']:.5g}  "
          f"mean rise {r['mean_rise']:.5g}")
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "analyze", help="loss-landscape plots, roughness and top Hessian eigenvalue of a run",
        description=__doc__,
    )
    p.add_argument("run_dir", metavar="RUN_DIR", help="a run directory (run.json, checkpoint.pt)")
    p.add_argument("--out", help="output directory (default RUN_DIR/analysis)")
    p.add_argument("--points", type=int, default=21, help="grid points per axis (default 21)")
    p.add_argument("--radius", type=float, default=1.0,
                   help="grid half-width in filter-normalised units (default 1.0)")
    p.add_argument("--batches", type=int, default=2,
                   help="training batches of eval_batch_size the loss is averaged over (default 2)")
    p.add_argument("--iters", type=int, default=100, help="power iterations at most (default 100)")
    p.add_argument("--tol", type=float, default=1e-5,
                   help="relative tolerance of the eigenvalue (default 1e-5)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random directions")
    p.add_argument("--device", help="override the run's device (e.g. cpu)")
    p.add_argument("--no-plots", action="store_true", help="write analysis.json only")
    p.add_argument("--trust-checkpoint", action="store_true", help=TRUST_HELP)
    p.set_defaults(func=cmd_analyze)

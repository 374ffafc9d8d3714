"""`lorakit serve`: an OpenAI-compatible server for one base model and many LoRA adapters."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("serve", help="serve a base model and its adapters over HTTP (OpenAI API)",
                                   description=__doc__)
    parser.add_argument("--model", default="smollm2-135m-instruct",
                        help="built-in model name, HF folder or .gguf file (default: smollm2-135m-instruct)")
    parser.add_argument("--adapters", default=None, help="folder whose sub-folders are PEFT adapters")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--api-key", default=None,
                        help="require 'Authorization: Bearer KEY' (or LORAKIT_API_KEY)")
    parser.add_argument("--max-batch", type=int, default=16, help="running requests at most")
    parser.add_argument("--max-loras", type=int, default=8, help="adapter slots in the running batch")
    parser.add_argument("--max-lora-rank", type=int, default=16, help="largest adapter rank a slot holds")
    parser.add_argument("--max-cpu-loras", type=int, default=32, help="parsed adapters kept in host memory")
    parser.add_argument("--max-queue", type=int, default=256, help="waiting requests before answering 429")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--device", default=None,
                        help="cpu, cuda or cuda:N (default: CUDA when there is a device, else cpu)")
    scale = parser.add_argument_group("replicas (Ray Serve; pip install lorakit[ray]; docs/distributed.md)")
    scale.add_argument("--ray", action="store_true",
                       help="serve with Ray Serve replicas routed by adapter (joins RAY_ADDRESS if set)")
    scale.add_argument("--replicas", type=int, default=2, help="engine replicas with --ray (default 2)")
    scale.add_argument("--adapters-per-replica", type=int, default=None,
                       help="adapters a replica keeps for affinity (default: --max-loras)")
    scale.add_argument("--replica-cpus", type=float, default=1.0, help="CPUs Ray reserves per replica")
    scale.add_argument("--replica-gpus", type=float, default=0.0, help="GPUs Ray reserves per replica")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from lorakit.serve.server import ServeOptions, run_server

    options = ServeOptions(model=args.model, adapters=args.adapters, host=args.host, port=args.port,
                           api_key=args.api_key, max_batch=args.max_batch, max_loras=args.max_loras,
                           max_lora_rank=args.max_lora_rank, max_cpu_loras=args.max_cpu_loras,
                           max_queue=args.max_queue, dtype=args.dtype, device=args.device)
    if args.ray:
        from lorakit.serve.ray_app import RayOptions, run_ray_server

        if args.replicas < 1:
            raise ValueError(f"--replicas must be >= 1, got {args.replicas}")
        scale = RayOptions(replicas=args.replicas, adapters_per_replica=args.adapters_per_replica,
                           replica_cpus=args.replica_cpus, replica_gpus=args.replica_gpus)
        run_ray_server(options, scale)
        return 0
    run_server(options)
    return 0

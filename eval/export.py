r"""Upload-ready directories of a run's selected policy and final RM, each with a model card.

    python eval/export.py --run runs/mt --out export/ --name Llama-3-8B-Instruct-MT
    hf upload ORG/Llama-3-8B-Instruct-MT export/Llama-3-8B-Instruct-MT

Writes OUT/NAME/ (the selected policy, summary.json) and OUT/NAME-RM/ (the final RM; --rm_name
renames it): every file of the checkpoint (config.json, safetensors and index, tokenizer files,
generation_config.json), the base model's license files, and a README.md model card: base models,
data and split sizes, the method, every hyperparameter of the run's config.json, each iteration's
selection and filtering decisions, and the evaluation found in RUN/eval/ (eval/tables.py).

Licenses: LICENSE*, USE_POLICY.md and NOTICE* of each base model's directory are copied, and the
card says their terms apply. A Llama 3 base (model_type llama and "llama-3"/"llama3" in its path or
_name_or_path) carries the Meta Llama 3 Community License: the name must begin with "Llama-3", the
card says "Built with Meta Llama 3", and the license file must be there (or --license_file).
"""
from __future__ import annotations

import json
import re
import shutil
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):  # `python eval/export.py`: make `mt` and `eval` importable from the repo root
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from eval import tables  # noqa: E402
from mt import dist  # noqa: E402
from mt.checkpoint import replace_dir  # noqa: E402
from mt.flags import ConfigError, parse  # noqa: E402
from mt.data import read_json  # noqa: E402
from mt.errors import UserError  # noqa: E402
from mt.manifest import iteration_dirs, lock_run_dir  # noqa: E402
from mt.runs import is_run_dir, resolve_model  # noqa: E402

PAPER = "https://arxiv.org/abs/2506.06292"
LICENSE_FILES = ("LICENSE", "LICENSE.txt", "LICENSE.md", "USE_POLICY.md", "NOTICE", "NOTICE.txt",
                 "NOTICE.md")
LLAMA3 = re.compile(r"llama[-_ ]?3", re.I)  # Meta-Llama-3-8B-Instruct, FsfairX-LLaMA3-RM-v0.1
EVAL_COMMANDS = """python eval/rewardbench.py --rm {run} --data reward-bench-filtered.jsonl --out {run}/eval/rewardbench.json
python eval/generate.py --policy {run} --format alpacaeval --prompts alpaca_eval.json --out {run}/eval/alpacaeval/model_outputs.json
alpaca_eval evaluate --model_outputs {run}/eval/alpacaeval/model_outputs.json"""


@dataclass
class ExportArgs:
    """python eval/export.py: a run's selected policy and final RM as upload-ready directories."""
    run: str = ""  # (required) a finished run directory (run_em.py --out)
    out: str = ""  # (required) the export folder: OUT/NAME/ and OUT/RM_NAME/ are (re)written
    name: str = ""  # (required) the policy's model name, e.g. Llama-3-8B-Instruct-MT
    rm_name: str = ""  # the RM's model name; "" = NAME-RM
    license_file: str = ""  # the base's license when its directory has none (Meta's LICENSE for Llama 3)


# ---- the base models and their licenses


@dataclass
class Base:
    path: str  # as config.json has it (--policy / --rm)
    model_type: str | None
    name_or_path: str | None
    licenses: list[Path]

    @property
    def llama3(self) -> bool:
        names = f"{self.path} {self.name_or_path or ''}"
        return self.model_type == "llama" and bool(LLAMA3.search(names))

    @property
    def hub_id(self) -> str | None:
        """org/name when the base came from the Hub (its _name_or_path), else None."""
        n = self.name_or_path or ""
        return n if re.fullmatch(r"[\w.-]+/[\w.-]+", n) and not Path(n).exists() else None


def base_model(path: str) -> Base:
    d = Path(path)
    cfg = read_json(d / "config.json") if (d / "config.json").is_file() else {}
    lic = [d / f for f in LICENSE_FILES if (d / f).is_file()]
    return Base(path, cfg.get("model_type"), cfg.get("_name_or_path") or None, lic)


def check_license(base: Base, name: str, flag: str, license_file: str) -> dict[str, Path]:
    """The license files to copy, {name in the export: source}; refuses what Llama 3's license
    forbids (§1.b.i: the license goes with the model, and its name begins with "Llama 3")."""
    files = {f.name: f for f in base.licenses}
    if license_file:
        if not Path(license_file).is_file():
            raise ConfigError(f"--license_file {license_file}: does not exist")
        if not any(n.startswith("LICENSE") for n in files):  # the base's own license comes first
            files["LICENSE"] = Path(license_file)
    if base.llama3:
        if not name.startswith("Llama-3"):
            raise ConfigError(f"{flag} {name}: the base model {base.path} is Llama 3, whose license "
                              "requires a derived model's name to begin with \"Llama 3\". Fix: "
                              f"{flag} Llama-3-{name} (e.g. Llama-3-8B-Instruct-MT)")
        if not any(n.startswith("LICENSE") for n in files):
            raise ConfigError(f"{base.path}: a Llama 3 base model with no LICENSE file, and the "
                              "Meta Llama 3 Community License must go with the model. Fix: put "
                              "Meta's LICENSE file (from the base model's repository) in "
                              f"{base.path}, or pass --license_file PATH")
    return files


# ---- the model card


def _md(v) -> str:
    return json.dumps(v) if isinstance(v, (list, dict, bool)) or v is None else str(v)


def flatten(d: dict, prefix: str = "") -> dict:
    """config.json's sections as dotted keys (em.tau), the flags that set them."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def split_sizes(run: Path) -> dict[str, int]:
    return {p.stem: sum(1 for line in open(p) if line.strip())
            for p in sorted((run / "splits").glob("*.jsonl"))}


def decisions(run: Path) -> list[str]:
    """One table row per iteration: Eq. 6-7 win rates and choice, ε_t and the filter, RM eval."""
    rows = []
    for it in iteration_dirs(run):
        sel = read_json(it / "selection.json") if (it / "selection.json").is_file() else {}
        info = (read_json(it / "pseudo_pairs.info.json")
                if (it / "pseudo_pairs.info.json").is_file() else {})
        rm_eval = read_json(it / "rm_eval.json") if (it / "rm_eval.json").is_file() else {}
        rates = ", ".join(f"{k} {v['win_rate']:.3f}" for k, v in sel.get("candidates", {}).items())
        stop = "-" if not sel else ("stop" if sel.get("stop") else "no")
        eps = "-" if "eps_t" not in info else f"{info['eps_t']:.4g} ({info.get('strategy')})"
        kept = "-" if "n" not in info else f"{info.get('kept_total', info.get('kept'))}/{info['n']}"
        rm = ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}"
                       for k, v in rm_eval.items()) or "-"
        rows.append(f"| {it.relative_to(run).as_posix()} | {rates or '-'} | {sel.get('chosen') or '-'} | "
                    f"{sel.get('tau', '-')} | {stop} | {eps} | {kept} | {rm} |")
    return rows


def _inside(model: Path, run: Path) -> str:
    m, r = model.resolve(), run.resolve()
    return m.relative_to(r).as_posix() if m.is_relative_to(r) else str(model)


def model_card(role: str, name: str, other: str, run: Path, model: Path, cfg: dict, bases: dict,
               licenses: dict[str, Path], results: dict) -> str:
    base = bases[role]
    hub = [b.hub_id for b in bases.values() if b.hub_id]
    front = ["---", "library_name: transformers",
             f"pipeline_tag: {'text-generation' if role == 'policy' else 'text-classification'}",
             f"tags: [mutual-taught, {'dpo' if role == 'policy' else 'reward-model'}]"]
    if base.hub_id:
        front.append(f"base_model: {base.hub_id}")
    if base.llama3:
        front.append("license: llama3")
    front.append("---")
    what = ("policy (the checkpoint chosen by model selection, Eq. 7)" if role == "policy"
            else "reward model (the last M-step's, Eq. 5)")
    lines = [*front, f"# {name}", ""]
    if base.llama3:
        lines += ["Built with Meta Llama 3.", ""]
    lines += [f"The {what} of a Mutual-Taught run ([arXiv 2506.06292]({PAPER})): "
              f"`{_inside(model, run)}` "
              f"(the run's summary.json). Its {'reward model' if role == 'policy' else 'policy'} "
              f"is exported as `{other}`.", "",
              "## Base models", "", "| role | --flag in config.json | _name_or_path | model_type |",
              "|---|---|---|---|"]
    for r, b in bases.items():
        lines.append(f"| {r} | `{b.path}` | {b.name_or_path or '-'} | {b.model_type or '-'} |")
    sizes = split_sizes(run)
    lines += ["", "## Data", "", f"Prompts: `{cfg.get('prompts')}`, partitioned by prompt id from the "
              f"seed ({cfg.get('seed')}) into "
              + ", ".join(f"{k} {v}" for k, v in sizes.items()) + " prompts (splits/*.jsonl).",
              "", "## Method", "",
              f"Mutual-Taught ({PAPER}), preset `{cfg.get('preset')}`, {cfg.get('iters')} iteration(s): "
              "each E-step samples responses from the current policy, scores them with the current "
              "RM and trains the policy by DPO (Eq. 4); model selection keeps the checkpoint with "
              "the best RM-judged win rate over the previous policy on D_MS and stops below τ "
              "(Eq. 6-7); pseudo-pairs (new policy ≻ previous policy on D_R, filtered with ε_t, "
              "Sec. 4.3) and the E-step pairs train the next RM by Bradley-Terry (Eq. 5).", "",
              "## Decisions of each iteration", "",
              "| iteration | win rate vs π_{t-1} on D_MS (Eq. 6) | chosen | τ | τ stop | ε_t "
              "(filter) | pseudo-pairs kept/total | RM evaluation (rm_eval.json) |",
              "|---|---|---|---|---|---|---|---|", *decisions(run), "", "## Evaluation", ""]
    done = results["alpacaeval"] or results["arenahard"] if role == "policy" else results["rewardbench"]
    if done:
        head = tables.TABLE1_HEAD if role == "policy" else tables.TABLE2_HEAD
        row = (tables.table1_row if role == "policy" else tables.table2_row)(name, results)
        lines += [f"From `{run.name}/eval/` (eval/README.md):", "", head, row]
    else:
        lines += ["Not evaluated yet. The commands (eval/README.md):", "", "```bash",
                  EVAL_COMMANDS.format(run=run.as_posix()), "```"]
    lines += ["", "## Hyperparameters (the run's config.json)", "", "| key | value |", "|---|---|",
              *(f"| {k} | `{_md(v)}` |" for k, v in flatten(cfg).items()), "", "## License", ""]
    if licenses:
        lines.append(f"Derived from `{base.path}`; its license files are copied here "
                     f"({', '.join(licenses)}) and their terms apply to this model.")
        if base.llama3:
            lines.append("It is a Llama 3 derivative: the Meta Llama 3 Community License applies "
                         "(its name begins with \"Llama 3\", \"Built with Meta Llama 3\" is shown, "
                         "and use follows Meta's Acceptable Use Policy).")
    else:
        lines.append(f"The base model directory `{base.path}` holds no license file: check its "
                     "license before publishing.")
    if hub:
        lines += ["", "Base models on the Hub: " + ", ".join(hub) + "."]
    return "\n".join(lines) + "\n"


# ---- writing


def export_model(model: Path, out: Path, card: str, licenses: dict[str, Path]):
    """Every file of the checkpoint, the licenses and the card, swapped into out atomically."""
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir(parents=True)
    for f in sorted(model.iterdir()):
        if f.is_file():
            shutil.copy2(f, tmp / f.name)
    for name, f in licenses.items():
        shutil.copy2(f, tmp / name)
    (tmp / "README.md").write_text(card)
    replace_dir(tmp, out)


def main(argv=None) -> dict:
    a = parse(sys.argv[1:] if argv is None else list(argv), ExportArgs(), "python eval/export.py",
              __doc__)
    missing = [k for k in ("run", "out", "name") if not getattr(a, k)]
    if missing:
        raise ConfigError(f"missing --{', --'.join(missing)} (--help lists every key)")
    run, out = Path(a.run), Path(a.out)
    if not is_run_dir(run):
        raise UserError(f"--run {run}: not a run directory (no summary.json). Fix: pass a finished "
                        "run_em.py --out")
    names = {"policy": a.name, "rm": a.rm_name or f"{a.name}-RM"}
    if names["policy"] == names["rm"]:
        raise ConfigError(f"--rm_name {a.rm_name}: the same name as --name. Fix: another name")
    models = {r: resolve_model(run, r) for r in names}
    cfg = read_json(run / "config.json")
    bases = {r: base_model(cfg[r]) for r in names}
    flags = {"policy": "--name", "rm": "--rm_name" if a.rm_name else "--name"}
    lic = {r: check_license(bases[r], names[r], flags[r], a.license_file) for r in names}
    results, _ = tables.collect(run)  # every check above: nothing is written before it
    lock_run_dir(out)  # a second export into the same folder is refused, naming this one
    written = {}
    for r in names:
        card = model_card(r, names[r], names["rm" if r == "policy" else "policy"], run, models[r],
                          cfg, bases, lic[r], results)
        export_model(models[r], out / names[r], card, lic[r])
        written[r] = str(out / names[r])
        print(f"{r}: {models[r]} -> {out / names[r]}", flush=True)
    return written


if __name__ == "__main__":
    dist.run(main)  # a user error: one `error: ...` line, exit status 2

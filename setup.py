"""Build hook: the default model, its small speculative-decoding draft and the prompt sets go into the wheel as
package data; the CPU engine's Q4_0 dot-product kernel (smallthinker_lab/engine/csrc/q4_0_dot.c) is compiled here,
at install time, never when the package is imported.

They live in the repository's ``data/`` folder (where ``smallthinker-lab data prepare`` and training write them)
and are copied into ``smallthinker_lab/_data`` of the built package, where ``smallthinker_lab.resources`` finds
them through importlib.resources. An editable install reads ``data/`` in place and copies nothing.
"""

from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
DATA = ROOT / "data"
# (folder under data/, file pattern): the files shipped; sub-folders (training logs, expert bundles) are not
SHIPPED = [(".", "README.md"), ("prompts", "*.jsonl"), ("models/smallthinker-tiny", "*"),
           ("models/smallthinker-tiny-draft", "*")]
REQUIRED = ["models/smallthinker-tiny/config.json", "models/smallthinker-tiny/model.safetensors",
            "models/smallthinker-tiny/tokenizer.json", "prompts/gsm8k.jsonl"]


class build_py_with_data(build_py):  # noqa: N801 (setuptools names commands in snake case)
    def run(self) -> None:
        super().run()
        if getattr(self, "editable_mode", False):
            return
        missing = [name for name in REQUIRED if not (DATA / name).is_file()]
        if missing:
            raise FileNotFoundError(f"cannot build smallthinker-lab without its package data: missing "
                                    f"{', '.join('data/' + m for m in missing)} (build from a complete checkout)")
        target = Path(self.build_lib) / "smallthinker_lab" / "_data"
        for folder, pattern in SHIPPED:
            for src in sorted((DATA / folder).glob(pattern)):
                if src.is_file():
                    dst = target / src.relative_to(DATA)
                    dst.parent.mkdir(parents=True, exist_ok=True)
                    self.copy_file(str(src), str(dst))


# Plain C loaded with ctypes (smallthinker_lab/engine/native.py), no Python API; AVX2 is chosen at run time, so
# the build needs no -march flag. optional: without a C compiler the install goes on and the engine says the kernel
# is missing (native.unavailable_reason) and uses its torch paths.
Q4_0_KERNEL = Extension("smallthinker_lab.engine._q4_0_dot", ["smallthinker_lab/engine/csrc/q4_0_dot.c"],
                        extra_compile_args=["-O3", "-std=c11"], optional=True)

setup(cmdclass={"build_py": build_py_with_data}, ext_modules=[Q4_0_KERNEL])

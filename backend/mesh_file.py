"""Reading mesh files (OBJ, glTF, PLY, ... through trimesh) for the CLI and the asset library:
the triangles, their UVs, and the colours their materials show as one texture.

A file of several parts or materials is joined here rather than by trimesh, whose joining of
textures multiplies sRGB bytes by a Base Color factor's bytes and wraps them (red turns cyan) and
can leave a part's texture out of the atlas it packs. Colours follow glTF and Blender's importers:
a Base Color factor and an MTL's Kd are linear light, textures sRGB.
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
from pathlib import Path
from urllib.parse import unquote

import numpy as np

from .colour import linear_to_srgb, srgb_to_linear
from .mesh import Mesh, MeshError
from .protocol import MAX_TEXTURE_SIZE


#: glTF extensions that compress geometry, which trimesh does not decode.
_COMPRESSIONS = {"KHR_draco_mesh_compression": "Draco (KHR_draco_mesh_compression)",
                 "EXT_meshopt_compression": "meshoptimizer (EXT_meshopt_compression)"}

#: Mesh files Kiln reads (trimesh's loaders for triangle meshes). Checked by name first: trimesh's
#: own refusal of an FBX or a .blend ("file_type 'fbx' not supported") names neither the formats
#: it does read nor how to get there.
MESH_SUFFIXES = (".glb", ".gltf", ".obj", ".ply", ".stl", ".off")


def load_mesh_file(path: Path) -> tuple[Mesh, object]:
    """The Mesh in a file, and the trimesh object it was read from (its parts joined, their
    colours on one texture through its UVs when any part has a texture)."""
    import trimesh

    if path.is_dir():
        raise MeshError(f"{str(path)!r} is a folder: give the mesh file in it")
    if not path.is_file():
        raise MeshError(f"mesh file {str(path)!r} does not exist")
    if path.suffix.lower() not in MESH_SUFFIXES:
        raise MeshError(unread_format(path))
    if path.stat().st_size == 0:  # an export or copy that failed part-way; trimesh's words name no cause
        raise MeshError(f"mesh file {str(path)!r} is empty (0 bytes): export or copy it again")
    compressed = [_COMPRESSIONS[name] for name in (_gltf_header(path) or {}).get("extensionsRequired", [])
                  if name in _COMPRESSIONS]
    if compressed:  # trimesh reads such a file as a heap of vertices at the origin, without a word
        raise MeshError(f"{str(path)!r} is compressed with {compressed[0]}, which Kiln's reader (trimesh) cannot "
                        "decode: export it uncompressed (Blender's glTF exporter: untick Compression)")
    try:
        loaded = join_parts(placed_parts(trimesh.load(path, force="scene", process=False)))
    except Exception as exc:  # trimesh raises many types for unreadable files
        gone = missing_buffer(path)
        raise MeshError(f"could not read {str(path)!r} as a mesh: "
                        + (f"{gone}: copy it there" if gone else f"{exc} (is it cut short or of another format? "
                           "export it again)")) from None
    faces = np.asarray(loaded.faces, np.int64).reshape(-1, 3)
    uv = getattr(loaded.visual, "uv", None)
    corner_uvs = None
    if uv is not None and len(uv) == len(loaded.vertices):
        corner_uvs = np.asarray(uv, np.float32)[faces]
    vertices = np.asarray(loaded.vertices, np.float64).reshape(-1, 3)
    origin = far_origin(vertices)
    mesh = Mesh((vertices if origin is None else vertices - origin).astype(np.float32), faces, corner_uvs,
                up_axis="y", name=path.stem, origin=origin)
    return mesh, loaded


def unread_format(path: Path) -> str:
    """Why a file of another type is not read, and the export that gets it read."""
    kinds = ", ".join(MESH_SUFFIXES)
    if path.suffix.lower() == ".blend":
        return (f"{str(path)!r} is a Blender file, which Kiln textures inside Blender: open it there and use the "
                "Kiln panel, or headless: blender -b FILE --python examples/batch_texture.py -- --prompt ...")
    what = f"a {path.suffix} file" if path.suffix else "a file without an extension"
    return (f"{str(path)!r} is {what}, and Kiln reads {kinds}: export it as .glb (it keeps the UVs and "
            "textures), or rename it if it is one of those")


def _gltf_header(path: Path) -> dict | None:
    """A glTF file's JSON (a GLB's JSON chunk only: its binary one may run to hundreds of MB), or
    None for other files and for what is not glTF (trimesh has read it, or said why not)."""
    suffix = path.suffix.lower()
    if suffix not in (".glb", ".gltf"):
        return None
    with path.open("rb") as file:
        if suffix == ".gltf":
            data = file.read()
        else:
            head = file.read(20)
            if head[:4] != b"glTF" or head[16:20] != b"JSON":
                return None
            data = file.read(struct.unpack("<I", head[12:16])[0])
    try:
        header = json.loads(data)
    except ValueError:
        return None
    return header if isinstance(header, dict) else None


def texture_placement_problem(path: Path) -> str | None:
    """Why the Base Color texture of a glTF file cannot be read as laid 1:1 on its first UV set,
    the only way trimesh reads it: a KHR_texture_transform (tiling, offset, rotation) or another
    UV set. None for other files, or when it is read right."""
    for material in (_gltf_header(path) or {}).get("materials", []):
        texture = material.get("pbrMetallicRoughness", {}).get("baseColorTexture")
        if texture is None:
            continue
        name = material.get("name", "a material")
        if "KHR_texture_transform" in texture.get("extensions", {}):
            return f"{name!r}'s Base Color texture is placed by KHR_texture_transform (tiled, offset or turned)"
        if texture.get("texCoord", 0) != 0:
            return f"{name!r}'s Base Color texture is read through UV set {texture['texCoord']}, not the first"
    return None


def missing_buffer(path: Path) -> str | None:
    """The file holding a .gltf's geometry that is not where it names it (trimesh says only its
    name), said with where it was looked for; None when none is missing."""
    for buffer in (_gltf_header(path) or {}).get("buffers", []):
        uri = buffer.get("uri", "") if isinstance(buffer, dict) else ""
        if uri and not uri.startswith("data:") and not (path.parent / unquote(uri)).is_file():
            return f"the file {unquote(uri)!r} holding its geometry is not in {path.parent}"
    return None


def missing_texture(path: Path) -> str | None:
    """The file holding an OBJ's or glTF's colour texture (or an OBJ's material library) that is
    not where the model names it, moved or left behind in a copy; None when none is missing.
    trimesh drops such a texture without a word, leaving the material's flat colour."""
    if path.suffix.lower() == ".obj":
        return _obj_missing_texture(path)
    header = _gltf_header(path) or {}
    textures, images = header.get("textures", []), header.get("images", [])
    for material in header.get("materials", []):
        index = material.get("pbrMetallicRoughness", {}).get("baseColorTexture", {}).get("index")
        source = textures[index].get("source") if isinstance(index, int) and index < len(textures) else None
        uri = images[source].get("uri", "") if isinstance(source, int) and source < len(images) else ""
        if uri and not uri.startswith("data:") and not (path.parent / unquote(uri)).is_file():
            name = repr(material["name"]) if material.get("name") else "its material"
            return f"{name} shows the texture {unquote(uri)!r}, which is not in {path.parent}"
    return None


def _obj_missing_texture(path: Path) -> str | None:
    """``missing_texture`` for an OBJ: its ``mtllib`` files, and the ``map_Kd`` each names."""
    with path.open("rb") as file:
        libraries = [line[6:].decode(errors="replace").strip() for line in file if line.startswith(b"mtllib")]
    for name in libraries:
        library = path.parent / name
        if not library.is_file():
            return f"its material library {name!r} is not in {path.parent}"
        material = "a material"
        for line in library.read_text(errors="replace").splitlines():
            words = line.split()
            if words[:1] == ["newmtl"]:
                material = " ".join(words[1:])
            elif words[:1] and words[0].lower() == "map_kd" and len(words) > 1:
                # options (-s 1 1 1, -bm 0.5...) come before the file name, which may hold spaces
                if not any((library.parent / " ".join(words[i:])).is_file() for i in range(1, len(words))):
                    return f"{material!r} in {name} shows the texture {words[-1]!r}, which is not in {library.parent}"
    return None


def placed_parts(scene: object) -> list:
    """Each triangle mesh of a trimesh scene where its node puts it, sharing its geometry's visual
    (material, texture, UVs): trimesh's own ``dump`` copies every image for every node, 2.4 GB
    and 4 s for 200 nodes of one 2048² texture."""
    import trimesh

    parts = []
    for node in scene.graph.nodes_geometry:
        transform, name = scene.graph[node]
        geometry = scene.geometry[name]
        if not isinstance(geometry, trimesh.Trimesh):
            continue  # points and lines have no surface to texture
        faces = geometry.faces[:, ::-1] if np.linalg.det(transform[:3, :3]) < 0 else geometry.faces  # mirrored
        part = trimesh.Trimesh(trimesh.transform_points(geometry.vertices, transform), faces,
                               visual=geometry.visual, process=False)
        part.metadata["name"] = name
        parts.append(part)
    return parts


#: Texels of each part's own edge colour around its cell of a joined texture, so that bilinear
#: reads and mipmaps at a cell's border do not take the next part's colours.
GUTTER = 2


def join_parts(parts: list) -> object:
    """One trimesh mesh of ``parts`` (in the file's frame), each showing its own colours.

    Parts that all show one texture keep it, and their UVs, as they are. When they show several,
    each part's colours (its texture with the Base Color factor folded in, else its flat or mean
    vertex colour) get a cell of one texture, at most ``MAX_TEXTURE_SIZE`` wide (parts showing the
    same pixels share one), and its UVs are moved into that cell: a part without UVs reads its
    cell's centre (``parts_without_uvs``), and UVs past the unit square (a tiled texture) are
    clamped to it, as one cell cannot repeat. Without textures, each part's flat colour becomes
    its vertex colours."""
    import trimesh
    from PIL import Image

    for part in parts:
        fold_base_colour_factor(getattr(part.visual, "material", None))
    if len(parts) < 2:
        return parts[0] if parts else trimesh.Trimesh()
    pictures = [part_picture(part) for part in parts]
    vertices = np.concatenate([p.vertices for p in parts])
    offsets = np.cumsum([0] + [len(p.vertices) for p in parts[:-1]])
    faces = np.concatenate([p.faces + o for p, o in zip(parts, offsets, strict=True)])
    if all(picture is None or picture.size == (1, 1) for picture in pictures):
        colours = [np.asarray(p.visual.vertex_colors)[:, :3] if getattr(p.visual, "kind", None) == "vertex"
                   else np.tile(picture.convert("RGB").getpixel((0, 0)) if picture else _GREY, (len(p.vertices), 1))
                   for p, picture in zip(parts, pictures, strict=True)]
        return trimesh.Trimesh(vertices, faces, vertex_colors=np.concatenate(colours).astype(np.uint8), process=False)
    hashed: dict[int, tuple] = {}  # parts often hold the very same image: hashed once
    for picture in pictures:
        if id(picture) not in hashed:
            hashed[id(picture)] = _picture_key(picture)
    keys = [hashed[id(picture)] for picture in pictures]
    distinct = dict(zip(keys, pictures, strict=True))  # parts showing the same texture share its cell
    cells = {key: k for k, key in enumerate(distinct)}
    if len(distinct) == 1 and all(getattr(p.visual, "uv", None) is not None for p in parts):
        # One texture for all (a node per part, one material): kept as it is, UVs and repeats too.
        return trimesh.Trimesh(vertices, faces, visual=trimesh.visual.TextureVisuals(
            uv=np.concatenate([p.visual.uv for p in parts]), material=parts[0].visual.material), process=False)
    columns = math.ceil(math.sqrt(len(distinct)))
    rows = math.ceil(len(distinct) / columns)
    largest = max(max(p.size) for p in pictures if p is not None)
    cell = min(largest + 2 * GUTTER, MAX_TEXTURE_SIZE // max(columns, rows))
    inner = cell - 2 * GUTTER
    atlas = np.zeros((rows * cell, columns * cell, 3), np.uint8)
    for k, picture in enumerate(distinct.values()):
        row, column = divmod(k, columns)
        texels = np.asarray((picture or Image.new("RGB", (1, 1), _GREY)).convert("RGB").resize((inner, inner)))
        atlas[row * cell:(row + 1) * cell, column * cell:(column + 1) * cell] = \
            np.pad(texels, ((GUTTER, GUTTER), (GUTTER, GUTTER), (0, 0)), mode="edge")
    uvs = []
    for part, key in zip(parts, keys, strict=True):
        row, column = divmod(cells[key], columns)
        uv = getattr(part.visual, "uv", None)
        own = np.full((len(part.vertices), 2), 0.5) if uv is None else np.clip(np.asarray(uv, np.float64), 0, 1)
        bottom = (rows - 1 - row) * cell  # UVs count rows from the bottom, images from the top
        uvs.append(np.stack([(column * cell + GUTTER + own[:, 0] * inner) / atlas.shape[1],
                             (bottom + GUTTER + own[:, 1] * inner) / atlas.shape[0]], axis=1))
    material = trimesh.visual.material.PBRMaterial(baseColorTexture=Image.fromarray(atlas), metallicFactor=0.0,
                                                   roughnessFactor=0.5)
    joined = trimesh.Trimesh(vertices, faces, visual=trimesh.visual.TextureVisuals(uv=np.concatenate(uvs),
                                                                                   material=material), process=False)
    joined.metadata[WITHOUT_UVS] = [p.metadata.get("name", f"part {k + 1}") for k, p in enumerate(parts)
                                    if getattr(p.visual, "uv", None) is None]
    return joined


#: The metadata key of a joined mesh's parts that had no UVs (each then reads one texel of its
#: flat colour): the joined map holds their colours, but cannot carry a texture on them.
WITHOUT_UVS = "kiln_parts_without_uvs"


def parts_without_uvs(loaded: object) -> list[str]:
    """The names of the parts of a file whose UVs ``join_parts`` made up."""
    return list(getattr(loaded, "metadata", {}).get(WITHOUT_UVS, []))


def _picture_key(picture: object | None) -> tuple:
    """Equal for parts showing the same pixels: a file's parts often share one texture."""
    if picture is None:
        return ()
    return picture.size, picture.mode, hashlib.sha1(picture.tobytes()).hexdigest()


#: What a part without a material shows: mid grey, sRGB.
_GREY = (153, 153, 153)


def part_picture(part: object) -> object | None:
    """A part's colours as a PIL image: its texture (read through its UVs), else a 1×1 image of its
    flat colour or the mean of its vertex colours; None without any."""
    from PIL import Image

    visual = part.visual
    material = getattr(visual, "material", None)
    image = getattr(material, "baseColorTexture", None) or getattr(material, "image", None)
    if image is not None and not is_placeholder(image) and getattr(visual, "uv", None) is not None:
        return image
    if getattr(visual, "kind", None) == "vertex":
        colour = np.asarray(visual.vertex_colors, np.float64)[:, :3].mean(axis=0)
        return Image.new("RGB", (1, 1), tuple(int(c + 0.5) for c in colour))
    if material is None:
        return None
    return Image.new("RGB", (1, 1), tuple(int(c * 255 + 0.5) for c in flat_colour(material)))


def flat_colour(material: object) -> np.ndarray:
    """What a material shows without a texture, sRGB in [0, 1]: glTF's Base Color factor (white
    when left out) or an MTL's Kd, both linear as Blender's importers read them; mid grey for
    the material trimesh makes up for a mesh with UVs and none of its own."""
    import trimesh

    if isinstance(material, trimesh.visual.material.PBRMaterial):
        factor = material.baseColorFactor
        linear = np.ones(3) if factor is None else np.asarray(factor, np.float64)[:3] / 255
    elif getattr(material, "diffuse", None) is not None and not is_placeholder(getattr(material, "image", None)):
        linear = np.asarray(material.diffuse, np.float64)[:3] / 255
    else:
        return np.asarray(_GREY, np.float32) / 255
    return linear_to_srgb(linear).astype(np.float32)


def is_placeholder(image: object) -> bool:
    """Whether ``image`` is the 2×2 grey trimesh makes up for a mesh with UVs and no material (an
    OBJ without its .mtl): refining from it would start from grey instead of saying nothing is there."""
    from trimesh.visual.material import color_image

    return image is not None and image.size == (2, 2) \
        and np.array_equal(np.asarray(image.convert("RGBA")), np.asarray(color_image()))


def fold_base_colour_factor(material: object) -> None:
    """Multiply a glTF material's Base Color texture by its factor, in linear light as glTF and
    Blender's importer do, and drop the factor, so nothing downstream applies it again."""
    import trimesh
    from PIL import Image

    if not isinstance(material, trimesh.visual.material.PBRMaterial) or material.baseColorTexture is None \
            or material.baseColorFactor is None:
        return
    factor = np.asarray(material.baseColorFactor, np.float64) / 255
    image = material.baseColorTexture
    if not np.allclose(factor, 1):
        mode = "RGBA" if "A" in image.getbands() else "RGB"
        texels = np.asarray(image.convert(mode), np.float64) / 255
        texels[..., :3] = linear_to_srgb(srgb_to_linear(texels[..., :3]) * factor[:3])
        if mode == "RGBA":
            texels[..., 3] *= factor[3]
        material.baseColorTexture = Image.fromarray((texels * 255 + 0.5).astype(np.uint8), mode)
    material.baseColorFactor = None


#: How many times its own size a mesh may lie from its file's origin before its positions are kept
#: relative to its centre: float32 then rounds them by over 1e-5 of that size.
FAR = 100.0


def far_origin(vertices: np.ndarray) -> np.ndarray | None:
    """The centre of float64 ``vertices`` when they lie over ``FAR`` times their size from zero,
    else None (the file's own origin serves, and stays the pivot of what Kiln writes back)."""
    finite = vertices[np.isfinite(vertices).all(axis=1)]  # NaN vertices are refused by ``validate``
    if not len(finite):
        return None
    lo, hi = finite.min(axis=0), finite.max(axis=0)
    centre, size = (lo + hi) / 2, float((hi - lo).max())
    return centre if np.abs(centre).max() > FAR * size else None

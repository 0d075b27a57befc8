"""An F32 copy of a GGUF file: every tensor dequantized (with tokenmill's dequantizers, checked
against gguf-py in the tests), every metadata field kept. llama.cpp then computes in fp32 on the
same values that tokenmill, transformers, vLLM and CTranslate2 load from the exported HF folder.

    python benchmarks/peers/gguf_to_f32.py OUT.gguf [--src FILE.gguf]
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType, GGUFWriter

from tokenmill.quant.gguf_quants import dequantize


def convert(src: str, out: str) -> None:
    reader = GGUFReader(src)
    arch = reader.fields["general.architecture"].contents()
    writer = GGUFWriter(out, arch)
    for name, field in reader.fields.items():
        if name.startswith("GGUF.") or name == "general.architecture":
            continue  # the writer adds its own header fields
        kind = field.types[0]
        if kind == GGUFValueType.ARRAY:
            writer.add_array(name, field.contents())
        else:
            writer.add_key_value(name, field.contents(), kind)
    writer.add_file_type(0)  # ALL_F32 (overrides the copied general.file_type)
    for t in reader.tensors:
        shape = tuple(int(d) for d in reversed(t.shape))  # GGUF lists dims fastest first
        raw = torch.from_numpy(np.asarray(t.data).view(np.uint8).copy())
        values = dequantize(raw, int(t.tensor_type), shape).numpy().astype(np.float32)
        writer.add_tensor(t.name, values, raw_dtype=GGMLQuantizationType.F32)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def main() -> None:
    from tokenmill.models.gguf import resolve_default_model

    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("out")
    ap.add_argument("--src", default=None)
    args = ap.parse_args()
    convert(args.src or str(resolve_default_model()), args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

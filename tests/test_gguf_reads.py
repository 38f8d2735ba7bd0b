"""`shared_gguf_reads`: within it a GGUF file is parsed once however often transformers opens it,
and gguf's own reader and name map are back afterwards (a real GGUF, written by gguf's writer)."""

import gguf
import numpy as np

from amq.modeling.gguf_reads import shared_gguf_reads


def test_one_parse_per_file_inside_and_the_originals_after(tmp_path):
    path = tmp_path / "tiny.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(2)
    writer.add_tensor("blk.0.attn_q.weight", np.arange(16, dtype=np.float32).reshape(4, 4))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    reader_cls, name_map = gguf.GGUFReader, gguf.get_tensor_name_map
    with shared_gguf_reads():
        first = gguf.GGUFReader(path)
        assert gguf.GGUFReader(str(path)) is first  # str or Path: one parse
        assert gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 2) is gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 2)
        assert np.array_equal(np.asarray(first.tensors[0].data).reshape(4, 4), np.arange(16, dtype=np.float32).reshape(4, 4))
    assert gguf.GGUFReader is reader_cls and gguf.get_tensor_name_map is name_map
    assert gguf.GGUFReader(path) is not first

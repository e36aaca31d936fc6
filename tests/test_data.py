"""Manifests as people export them: a byte-order mark, CRLF, `;`, quoted line breaks, header spaces and
case are read correctly; what cannot be read whole is refused naming the file and the problem."""
import pytest

from pipeline import data as dataio
from pipeline.errors import InputError

ROWS = [{"id": "a1", "image": "img/a1.png", "caption": "Two colours, asymmetric.\nClinical impression: nevus",
         "label": "nevus"},
        {"id": "a2", "image": "img/a2.png", "caption": "One colour; symmetric border.", "label": "melanoma"}]


def write(path, text: str, encoding="utf-8"):
    path.write_bytes(text.encode(encoding))
    return path


def csv_text(delimiter=",", header=("id", "image", "caption", "label"), newline="\n") -> str:
    def cell(v):
        return '"' + v.replace('"', '""') + '"' if any(ch in v for ch in (delimiter, "\n", '"', ";")) else v
    lines = [delimiter.join(header)] + [delimiter.join(cell(r[k]) for k in ("id", "image", "caption", "label"))
                                        for r in ROWS]
    return newline.join(lines) + newline


@pytest.mark.parametrize("form", ["plain", "bom", "crlf", "semicolon", "tab", "bom_crlf_semicolon"])
def test_exported_forms_read_the_same_rows(tmp_path, form):
    delimiter = {"semicolon": ";", "tab": "\t", "bom_crlf_semicolon": ";"}.get(form, ",")
    newline = "\r\n" if "crlf" in form else "\n"
    text = ("\ufeff" if "bom" in form else "") + csv_text(delimiter, newline=newline)
    rows = dataio.read_manifest(write(tmp_path / "manifest.csv", text))
    assert rows == ROWS  # the quoted caption keeps its line break, and nothing else is added


def test_header_names_with_spaces_and_another_case(tmp_path):
    text = csv_text(header=(" ID", "Image ", " Caption", "LABEL"))
    assert dataio.read_manifest(write(tmp_path / "manifest.csv", text)) == ROWS
    jsonl = tmp_path / "manifest.jsonl"
    jsonl.write_text('{" Id ": "x", "IMAGE": "i.png", "caption": "c", "Fitzpatrick": "II"}\n')
    assert dataio.read_manifest(jsonl) == [{"id": "x", "image": "i.png", "caption": "c", "Fitzpatrick": "II"}]


def test_two_headers_that_mean_one_column_are_refused(tmp_path):
    text = "id,image,caption,Caption\n1,a.png,x,y\n"
    with pytest.raises(InputError, match=r"manifest.csv: the header names \['caption', 'Caption'\] all mean"):
        dataio.read_manifest(write(tmp_path / "manifest.csv", text))


def test_an_unclosed_quote_is_refused_naming_the_line(tmp_path):
    text = 'id,image,caption\n1,a.png,"fine"\n2,b.png,"never closed\n3,c.png,x\n'
    with pytest.raises(InputError, match=r"manifest.csv: line \d+: .*unclosed quote"):
        dataio.read_manifest(write(tmp_path / "manifest.csv", text))


def test_a_header_without_the_required_columns_names_what_it_found(tmp_path):
    with pytest.raises(InputError, match=r"missing required column\(s\) \['caption'\]; found \['id', 'image'\]"):
        dataio.read_manifest(write(tmp_path / "manifest.csv", "id;image\n1;a.png\n"))

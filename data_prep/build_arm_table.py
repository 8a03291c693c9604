"""Builds the vendored hg38 gene -> chromosome-arm table from the proxbias 0.11.0 wheel.

    python -m data_prep.build_arm_table --out=mae_jax/data/gene_arms_hg38.tsv.gz

The rule is proxbias' `chromosome_info._load_genes` (docs/science.md §3.5): chr1-22, X, Y; per symbol
start = min txStart, end = max txEnd; drop symbols on several chromosomes and symbols matching
the regex ``^LOC*`` (which, as upstream, also drops every symbol starting with "LO"); the arm is q
when the gene ends past the centromere midpoint. Source tables: UCSC hg38 ncbiRefSeq and
centromeres, as shipped inside the proxbias wheel (Apache-2.0 package; public annotation data).
The faithful regex gives 28,075 genes on 45 arms (28,089 when counted without
dropping the 14 "LO..." genes that the regex also removes).
"""
import csv
import gzip
import io
import re
import zipfile

from mae_jax.data import resources
from mae_jax.util import cli

VALID_CHROMS = [f"chr{i}" for i in range(1, 23)] + ["chrX", "chrY"]


def build_rows(wheel_path):
  with zipfile.ZipFile(wheel_path) as zf:
    centro = zf.read("proxbias/data/centromeres_hg38.tsv").decode()
    refseq = gzip.decompress(zf.read("proxbias/data/ncbirefseq_hg38.tsv.gz")).decode()
  lo, hi = {}, {}
  for row in csv.DictReader(io.StringIO(centro), delimiter="\t"):
    c = row["chrom"]
    lo[c] = min(lo.get(c, 1 << 62), int(row["chromStart"]))
    hi[c] = max(hi.get(c, 0), int(row["chromEnd"]))
  mid = {c: (lo[c] + hi[c]) / 2 for c in lo}
  genes = {}
  for row in csv.DictReader(io.StringIO(refseq), delimiter="\t"):
    if row["chrom"] not in VALID_CHROMS:
      continue
    g = genes.setdefault(row["name2"], [set(), 1 << 62, 0])
    g[0].add(row["chrom"])
    g[1] = min(g[1], int(row["txStart"]))
    g[2] = max(g[2], int(row["txEnd"]))
  rows = []
  for name, (chroms, start, end) in genes.items():
    if len(chroms) > 1 or re.match("^LOC*", name):
      continue
    chrom = next(iter(chroms))
    arm = chrom + ("q" if end > mid[chrom] else "p")
    rows.append((name, chrom, start, end, arm))
  order = {c: i for i, c in enumerate(VALID_CHROMS)}
  rows.sort(key=lambda r: (order[r[1]], r[2], r[0]))
  return rows


def main(argv=None):
  p = cli.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--out", required=True)
  args = p.parse_args(argv)
  wheel = resources.fetch_wheel("proxbias")
  rows = build_rows(wheel)
  buf = io.StringIO()
  buf.write("gene\tchrom\tstart\tend\tarm\n")
  for r in rows:
    buf.write("\t".join(map(str, r)) + "\n")
  with gzip.GzipFile(args.out, "wb", mtime=0) as f:
    f.write(buf.getvalue().encode())
  print(f'{{"genes": {len(rows)}, "arms": {len({r[4] for r in rows})}}}')


if __name__ == "__main__":
  cli.run(main, absl_flags=False)

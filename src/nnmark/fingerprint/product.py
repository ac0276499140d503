"""A fingerprinted product: one base model, one key, one code family, one registry of issued copies.

Typical use (the ``nnmark fingerprint`` commands do exactly this)::

    prod = Product.create("shop/", "base.safetensors", code="ag:7")   # writes shop/key.json (0600)
    prod.add_customers(["alice", "bob", "carol"])
    prod.issue("alice")                         # -> IssuedCopy (file under shop/copies/, SHA-256 recorded)
    report = prod.trace("leaked.safetensors")   # -> TraceReport (JSON-able)

A product directory holds ``product.json`` (public parameters), ``key.json`` (the
secret, mode 0600, never printed), ``base.safetensors`` (the vendor's model, copied
in), ``registry.db`` (SQLite; or any SQLAlchemy URL given at creation) and
``copies/``. ``Product.open`` also accepts the registry's database file or URL
(the parameters are stored in the registry too; the key file is then ``key.json``
beside the database unless given).

Issuing is crash-safe through the registry (:mod:`nnmark.registry.store`): reserve a
code, write the copy atomically, complete the record with the file's SHA-256; any
error aborts the reservation and removes the partial file, and
:meth:`Product.recover` settles reservations left by killed issuers (completing those
whose file exists *and* carries the reserved fingerprint).

Every copy also carries its customer's own secret component (:mod:`nnmark.fingerprint.own`): a keyed
random direction in the carrier layers that no other copy contains, and codes are handed out in a secret,
key-derived order (:mod:`nnmark.codes.order`).

Tracing (:meth:`Product.trace`) extracts the fingerprint with the carrier, decodes the
identity code with the structural AND-ACC decoder (:mod:`nnmark.codes.andacc`; the paper's
hard threshold on request), maps the named codes to customers through the registry, and tests every
issued customer's own component. It names a customer only when that test's exact p-value is at most
``alpha / n_codes`` (:data:`DECISION_RULE`), so that whatever a coalition does with its copies -- any number
of them, weights of any sign -- the probability that it gets any innocent customer named is at most
``alpha``. Codes the decoder names whose holders' components are absent are listed as suspects, never
accused; the community code gives a shortlist, never an accusation. See :class:`TraceReport`.

Products created before the per-copy components (no ``own`` parameters) still open, issue and trace, but
their copies carry nothing a frame cannot rebuild: their traces name nobody (status ``"unprotected"``) and
list the decoder's codes as suspects; their registries keep the public order in which they were filled.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from nnmark.alignment import align_to_model
from nnmark.codes import AndAccCode, FingerprintLayout, ProductAndAccCode, ReedSolomonAndAccCode
from nnmark.codes.andacc import DEFAULT_TAU
from nnmark.codes.order import secret_issue_order
from nnmark.fingerprint.carrier import FingerprintCarrier, FingerprintError, patch_moment
from nnmark.fingerprint.issue import IssueConfig, correction_metrics, issue_copy
from nnmark.fingerprint.own import (
    DEFAULT_RIDGE,
    DEFAULT_STRENGTH,
    OWN_NULL_HYPOTHESIS,
    OwnComponents,
    z_level,
    z_to_p,
)
from nnmark.io import file_sha256, load_model, save_model, spec_difference
from nnmark.keyfile import KeyFile, load_key_file, save_key_file
from nnmark.keys import Key
from nnmark.registry import IssuedCopy, RecoveryReport, Registry, RegistryNotFoundError
from nnmark.registry.store import database_url
from nnmark.safejson import JSONLimitError
from nnmark.safejson import loads as safe_json_loads

CONFIG_NAME = "product.json"
KEY_NAME = "key.json"
MAX_CONFIG_BYTES = 1 << 20  # product.json: public parameters, a few KB
BASE_NAME = "base.safetensors"
REGISTRY_NAME = "registry.db"
COPIES_DIR = "copies"
FORMAT = "nnmark-fingerprint-product"
KEY_SCHEME = "fingerprint"
DECODERS = ("structural", "threshold")

DECISION_RULE = (
    "a customer is named only when the exact p-value of its own secret component, p_u = P[N(0,1) >= z_u] under "
    "H0_u (the suspect was made without u's copy and without the key; doubled when the suspect is read both as "
    "given and aligned to the base, the larger z kept), is <= alpha / (number of codes); every "
    "issued customer is tested, so the probability of naming any customer whose copy was not used is at most "
    "alpha (Bonferroni), whatever was done with the other copies. The AND-ACC decoder (structural: the "
    "codewords in every coalition of 1..k-1 whose weighted average of +-1 codes explains the coefficients; "
    "threshold: between 1 and k-1 codewords whose blocks exactly cover the coefficients <= tau * gain) is "
    "reported beside it (code_named); codes it names whose holders' components fail the test are suspects, "
    "never accused. With scan=False only the decoder's codes are tested (named = decoded AND p_u <= alpha / n)"
)


def parse_code(spec: str) -> tuple[str, int, int, str]:
    """``"ag:7"`` -> ``("ag", 7, 1, "")``; ``"pg:5"``; ``"ag:11x2"`` -> two codebooks side by side
    (``"x"``); ``"ag:11rs4"`` -> four codebooks chained by a Reed-Solomon outer code (``"rs"``,
    :class:`~nnmark.codes.ReedSolomonAndAccCode`: traces up to 3 colluders among 17,161 customers)."""
    m = re.fullmatch(r"\s*(ag|pg)\s*:\s*(\d+)\s*(?:(x|rs)\s*(\d+))?\s*", str(spec).lower())
    if not m or (m.group(3) == "x" and m.group(4) not in ("1", "2")) or (m.group(3) == "rs" and int(m.group(4)) < 2):
        raise FingerprintError(f"code must look like ag:7, pg:5, ag:11x2 (two codebooks) or ag:11rs4 (four "
                               f"codebooks chained by a Reed-Solomon code), got {spec!r}")
    parts = int(m.group(4) or 1)
    return m.group(1), int(m.group(2)), parts, (m.group(3) or "") if parts > 1 else ""


def build_layout(key: Key, code: str, crc_bits: int = 0) -> FingerprintLayout:
    """The fingerprint layout ``CRC || CIC`` of a code spec (see :func:`parse_code`) under ``key``."""
    family, q, parts, outer = parse_code(code)
    sub = key.child("fingerprint/code")
    try:
        cic: AndAccCode | ProductAndAccCode | ReedSolomonAndAccCode
        if parts == 1:
            cic = AndAccCode.from_key(sub, family, q)
        elif outer == "x":
            cic = ProductAndAccCode.from_key(sub, family, q)
        else:
            cic = ReedSolomonAndAccCode.from_key(sub, family, q, parts=parts)
    except ValueError as exc:
        raise FingerprintError(f"code {code!r}: {exc}") from None
    return FingerprintLayout(cic, crc_bits)


def _decoding_parts(dec: Any) -> list[Any]:
    """The per-codebook decodings inside a trace's identity-code decoding."""
    if hasattr(dec, "parts"):
        return list(dec.parts)
    if hasattr(dec, "half_a"):
        return [dec.half_a, dec.half_b]
    return [dec]


def _slug(name: str) -> str:
    s = re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("._")[:48] or "customer"
    return f"{s}-{hashlib.sha256(name.encode()).hexdigest()[:8]}"


@dataclass
class ProductConfig:
    """The public parameters of a product (``product.json``; also stored in the registry)."""

    name: str
    base_sha256: str
    key_id: str
    code: str
    spec: dict[str, Any]
    layers: list[str] = field(default_factory=lambda: ["conv4"])
    crc_bits: int = 0
    scale: float = 1.0
    tau: float = DEFAULT_TAU
    decoder: str = "structural"
    alpha: float = 1e-3
    data: str | None = None
    issue: dict[str, Any] = field(default_factory=dict)
    registry_url: str | None = None  # None: registry.db in the product directory
    base_file: str = BASE_NAME
    created_at: float = 0.0
    format: str = FORMAT
    own: dict[str, Any] = field(default_factory=dict)  # per-copy components: {} for products made before them
    code_order: str = "public"  # "keyed" (secret, key-derived) for new products; "public" for older ones

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ProductConfig:
        if not isinstance(d, dict) or d.get("format") != FORMAT:
            raise FingerprintError("not an nnmark fingerprint product configuration")
        try:
            return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})
        except TypeError as exc:
            raise FingerprintError(f"malformed product configuration: {exc}") from None


@dataclass(frozen=True)
class Accusation:
    """A named customer: its code, community, and the evidence of its own copy.

    ``p_value``: the exact p-value of the customer's own component under H0_u (:data:`OWN_NULL_HYPOTHESIS`;
    doubled when the suspect was read both as given and aligned), ``z`` its statistic (the larger of the reads);
    ``code_named``: whether the AND-ACC decoder also named the customer's code, and
    ``code_p_value`` the decoder's p-value of that code's presence (``None`` when it did not name it)."""

    customer: str
    code: int
    community: str | None
    p_value: float
    z: float | None = None
    code_named: bool = True
    code_p_value: float | None = None


@dataclass
class TraceReport:
    """The result of tracing one suspect model (JSON-able through :meth:`to_dict`).

    ``status``: ``"accused"`` (customers named: their own components pass the gate, see
    :data:`DECISION_RULE`), or why nobody is: ``"weak-evidence"`` (the decoder names issued codes, but their
    holders' own components are absent -- a frame built from other copies, or noise: listed in
    ``suspects``), ``"unissued-code"`` (a decoded code belongs to no issued copy), ``"unprotected"`` (a
    product made before per-copy components: nothing can be proved against a frame, the decoder's codes
    are listed in ``suspects``), or the decoder's refusal (structural decoder: ``"no-candidate"``: no prefix
    of the sorted coefficients is a union of 1..k-1 blocks, e.g. an unmarked model or a coalition of k or
    more; ``"unexplained"``: no coalition's levels fit; threshold decoder: ``"too-many"``,
    ``"no-candidate"``, ``"unexplained"``, ``"empty-zero-set"``; ``"ambiguous"``: several explaining
    coalitions share nobody, or two codebooks: suspects but nobody provable).
    ``accused``: the named customers, each with its own component's exact p-value under
    ``null_hypothesis`` (:data:`~nnmark.fingerprint.own.OWN_NULL_HYPOTHESIS`) and whether the decoder named
    its code. ``suspects``: customers whose codes the decoder names but who are not accused, with their
    components' ``z`` and ``p_value`` (never an accusation). ``community_shortlist``: customers whose
    community code is near the extracted one (a lead, never an accusation). ``verbatim_copy_of``: the
    customer whose issued file has exactly the suspect's SHA-256, if any. ``evidence``: decoder details
    (coefficient margins, zero set, its own null hypothesis) and the own-component scan (``evidence["own"]``).
    """

    product: str
    suspect: str
    suspect_sha256: str
    status: str
    accused: list[Accusation]
    ambiguous: list[str]
    community_shortlist: list[dict[str, Any]]
    verbatim_copy_of: str | None
    evidence: dict[str, Any]
    null_hypothesis: str = OWN_NULL_HYPOTHESIS
    decision_rule: str = DECISION_RULE
    suspects: list[dict[str, Any]] = field(default_factory=list)

    @property
    def named(self) -> list[str]:
        return [a.customer for a in self.accused]

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["accused"] = [asdict(a) for a in self.accused]
        return d

    def to_json(self, **kwargs: Any) -> str:
        return json.dumps(self.to_dict(), **kwargs)


class Product:
    """A fingerprinted product (use :meth:`create` or :meth:`open`)."""

    def __init__(self, root: Path, config: ProductConfig, key: Key, registry: Registry) -> None:
        self.root = root
        self.config = config
        self._key = key
        self.registry = registry
        self.layout = build_layout(key, config.code, config.crc_bits)
        self._base: nn.Module | None = None
        self._carrier: FingerprintCarrier | None = None
        self._data = None
        self._correction_metrics: dict | None = None
        self._own: OwnComponents | None = None

    # -- construction -----------------------------------------------------------------
    @classmethod
    def create(cls, directory: str | Path, base_model: str | Path, *, name: str | None = None,
               key: Key | None = None, code: str = "ag:7", crc_bits: int = 0, layers: Sequence[str] = ("conv4",),
               scale: float = 2.0, tau: float = DEFAULT_TAU, alpha: float = 1e-6, data: str | None = None,
               issue: IssueConfig | None = None, registry_url: str | None = None,
               decoder: str = "structural", own_strength: float = DEFAULT_STRENGTH,
               own_ridge: float = DEFAULT_RIDGE) -> Product:
        """Create a product directory from the vendor's base model file.

        ``key``: the product key (default: a fresh random one), written to ``key.json``
        (mode 0600). ``code``: ``ag:Q`` / ``pg:Q`` (one AND-ACC codebook) or ``ag:Qx2``
        (two side by side). ``crc_bits``: length of the community code part (0: none;
        customers then need no graph). ``layers``: carrier layers (default conv4).
        ``scale``: level of a +1 fingerprint entry in the weights' projection (default 2.0: on the mnist5k CNN,
        scale 1 / 2 / 3 cost 0.00 / 0.07 / 0.10 accuracy points on average (max 0 / 0.1 / 0.2) with the
        activation correction, while 2 halves the fingerprint's relative noise after fine-tuning or
        pruning the average of 10 copies against 1; see ``experiments/results/securemark/README.md``).
        ``decoder``: ``"structural"``
        (default; see :mod:`nnmark.codes.andacc`) or ``"threshold"`` (the paper's hard threshold ``tau``).
        ``alpha``: family-wise level of the p-value gate (see :data:`DECISION_RULE`): the probability, per trace,
        of naming anyone whose copy was not used is at most ``alpha`` (default 1e-6: a search of 1,400 frames at
        1e-3 named one innocent, as that level allows; colluders' own components sit at z = 40-175 after
        averaging, fine-tuning and pruning, far above the z = 5.5-6.5 that 1e-6 asks for 56-17,161 codes).
        ``data``: the dataset name used by fine-tuning issues (default: the base file's).
        ``registry_url``: a SQLAlchemy URL (default ``registry.db`` in the directory).
        ``own_strength`` / ``own_ridge``: the per-copy secret components (:mod:`nnmark.fingerprint.own`; default
        0.05: a 5 % RMS change of the carrier layers' pre-activations, ridge 10; ``own_strength=0`` makes a
        product without them, whose traces never accuse -- for measurements only).
        Codes are handed out in a secret key-derived order (:func:`~nnmark.codes.order.secret_issue_order`).
        Refuses an existing product directory.
        """
        root = Path(directory)
        if decoder not in DECODERS:
            raise FingerprintError(f"decoder must be one of {', '.join(DECODERS)}, got {decoder!r}")
        if not (own_strength >= 0 and own_ridge >= 0):
            raise FingerprintError(f"own_strength and own_ridge must be >= 0, got {own_strength}, {own_ridge}")
        if (root / CONFIG_NAME).exists() or (root / KEY_NAME).exists():
            raise FingerprintError(f"a product already exists in {root}")
        base, meta = load_model(base_model)
        key = key or Key.generate()
        layout = build_layout(key, code, crc_bits)
        FingerprintCarrier(key, base, layers, dim=layout.dim, scale=scale)  # capacity check: clear error
        issue_cfg = issue or IssueConfig()
        data = data or meta.get("data")
        if issue_cfg.train != "none" and not data:
            raise FingerprintError("fine-tune issuing needs the training data's name (give data=...)")
        root.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(base_model, root / BASE_NAME)
        cfg = ProductConfig(name=name or root.resolve().name, base_sha256=file_sha256(root / BASE_NAME),
                            key_id=key.key_id, code=code, spec=dict(base.spec), layers=list(layers),
                            crc_bits=int(crc_bits), scale=float(scale), tau=float(tau), decoder=decoder,
                            alpha=float(alpha), data=data,
                            issue=issue_cfg.to_dict(), registry_url=registry_url, created_at=time.time(),
                            own={"strength": float(own_strength), "ridge": float(own_ridge)} if own_strength else {},
                            code_order="keyed")
        key_file = KeyFile(key=key, scheme=KEY_SCHEME, params={"product": cfg.name})
        save_key_file(root / KEY_NAME, key_file)
        # commit the product key: key.json.commit.json (public) + commitments.db in the directory
        from nnmark.commitment import commit_key

        commit_key(root / KEY_NAME, key_file, model_sha256=cfg.base_sha256)
        codes = secret_issue_order(key, layout.cic)
        url = registry_url or database_url(root / REGISTRY_NAME)
        reg = Registry.create(url, product=cfg.name, base_sha256=cfg.base_sha256, key_id=key.key_id,
                              code_family=cfg.to_dict(), codes=codes)
        (root / CONFIG_NAME).write_text(json.dumps(cfg.to_dict(), indent=1))
        (root / COPIES_DIR).mkdir(exist_ok=True)
        prod = cls(root, cfg, key, reg)
        prod._base = base
        return prod

    @classmethod
    def open(cls, path: str | Path, *, key_file: str | Path | None = None) -> Product:
        """Open a product from its directory, or from its registry (database file or URL; the key file is
        ``key.json`` beside the database unless ``key_file`` is given). Raises :class:`FingerprintError`
        (not a product, wrong key) or a :class:`~nnmark.registry.RegistryError` (registry missing or for
        another product)."""
        text = str(path)
        if "://" not in text and Path(text).is_dir():
            root = Path(text)
            cfg_path = root / CONFIG_NAME
            if not cfg_path.is_file():
                raise FingerprintError(f"{root} is not a fingerprint product directory (no {CONFIG_NAME})")
            try:
                with cfg_path.open("rb") as fh:
                    cfg = ProductConfig.from_dict(safe_json_loads(fh.read(MAX_CONFIG_BYTES + 1),
                                                                  max_bytes=MAX_CONFIG_BYTES, what=str(cfg_path)))
            except JSONLimitError as exc:
                raise FingerprintError(str(exc) if "not valid" not in str(exc)
                                       else f"{cfg_path} is not valid JSON") from None
            url = cfg.registry_url or database_url(root / REGISTRY_NAME)
        else:
            if "://" not in text and not Path(text).exists():
                raise RegistryNotFoundError(f"no product directory or registry at {text}")
            url = database_url(text)
            probe = Registry.open(url)
            cfg = ProductConfig.from_dict(probe.product.code_family)
            root = Path(Registry._sqlite_path(url) or ".").parent if url.startswith("sqlite") else Path(".")
        kf = load_key_file(key_file or root / KEY_NAME, expect_scheme=KEY_SCHEME)
        if kf.key.key_id != cfg.key_id:
            raise FingerprintError(f"the key file is for key {kf.key.key_id}, this product uses key {cfg.key_id}")
        reg = Registry.open(url, product=cfg.name, base_sha256=cfg.base_sha256, key_id=cfg.key_id)
        return cls(root, cfg, kf.key, reg)

    # -- parts ------------------------------------------------------------------------
    @property
    def base_model(self) -> nn.Module:
        """The base model (loaded once; its file's SHA-256 is checked against the product's)."""
        if self._base is None:
            path = Path(self.config.base_file)
            path = path if path.is_absolute() else self.root / path
            if not path.is_file():
                raise FingerprintError(f"the product's base model file is missing: {path}")
            if file_sha256(path) != self.config.base_sha256:
                raise FingerprintError(f"the base model file {path} changed since the product was created")
            self._base, _ = load_model(path, expect_spec=self.config.spec)
        return self._base

    @property
    def carrier(self) -> FingerprintCarrier:
        if self._carrier is None:
            self._carrier = FingerprintCarrier(self._key, self.base_model, self.config.layers,
                                               dim=self.layout.dim, scale=self.config.scale)
        return self._carrier

    @property
    def issue_config(self) -> IssueConfig:
        return IssueConfig.from_dict(self.config.issue)

    def _train_data(self):
        if self._data is None:
            from nnmark.data import load_data

            if not self.config.data:
                raise FingerprintError("this product has no training data name; fine-tune issuing needs one")
            self._data = load_data(self.config.data).train
        return self._data

    def _metrics(self, cfg: IssueConfig, data):
        """The activation correction's metrics (computed once per product object: base and data are fixed)."""
        if not (cfg.correct and cfg.correction == "activation" and data is not None):
            return None
        if self._correction_metrics is None:
            self._correction_metrics = correction_metrics(self.base_model, self.carrier, data, cfg) or {}
        return self._correction_metrics

    @property
    def own(self) -> OwnComponents | None:
        """The per-copy secret components (:mod:`nnmark.fingerprint.own`; built once per product object), or
        ``None`` for a product made before them. Their shaping uses the patch moments of the carrier layers on
        the first ``metric_images`` training images of the product's data (unshaped without data)."""
        if not self.config.own or not self.config.own.get("strength"):
            return None
        if self._own is None:
            moments = {}
            if self.config.data:
                try:
                    data = self._train_data()
                except Exception as exc:  # noqa: BLE001 - any loader failure: say which data is missing
                    raise FingerprintError(f"the per-copy components are shaped on the product's data "
                                           f"{self.config.data!r}, which cannot be loaded ({exc})") from None
                images = data.x[: self.issue_config.metric_images]
                moments = {name: patch_moment(self.base_model, name, images) for name, _a, _b in self.carrier.chunks}
            self._own = OwnComponents(self._key, self.base_model, self.carrier, moments,
                                      strength=float(self.config.own["strength"]),
                                      ridge=float(self.config.own.get("ridge", DEFAULT_RIDGE)))
        return self._own

    def key_for_workers(self) -> Path:
        """Where issuing workers read the key (the file, never the secret itself)."""
        return self.root / KEY_NAME

    # -- customers ----------------------------------------------------------------------
    def add_customers(self, names: Iterable[str], communities: Sequence[str | None] | None = None,
                      community_codes: np.ndarray | None = None) -> int:
        """Register customers (names must be new). ``community_codes``: ``(n, crc_bits)`` 0/1 codes, required
        when the product has a community part; ``communities``: optional labels. Returns how many were added."""
        names = [str(n) for n in names]
        rows: list[dict[str, Any]] = []
        if self.config.crc_bits:
            if community_codes is None:
                raise FingerprintError(f"this product's fingerprints start with a {self.config.crc_bits}-bit "
                                       "community code: give the customers' social graph")
            codes = np.asarray(community_codes)
            if codes.shape != (len(names), self.config.crc_bits) or not np.isin(codes, (0, 1)).all():
                raise FingerprintError(f"community codes must be ({len(names)}, {self.config.crc_bits}) bits")
        for i, n in enumerate(names):
            row: dict[str, Any] = {"name": n}
            if communities is not None:
                row["community"] = communities[i]
            if self.config.crc_bits:
                row["community_code"] = "".join(str(int(b)) for b in codes[i])
            rows.append(row)
        return self.registry.add_customers(rows)

    def add_customers_from_graph(self, graph, names: Sequence[str] | None = None, seed: int = 0) -> int:
        """Register the nodes of a social graph (networkx) as customers with community codes
        (:func:`nnmark.codes.community_codes`) and community labels (Louvain, seeded). ``names``: the nodes
        to register (default: all, named by ``str(node)``); the codes use the whole graph."""
        import networkx as nx

        from nnmark.codes import community_codes

        if not self.config.crc_bits:
            raise FingerprintError("this product has no community code part (created with crc_bits=0)")
        nodes = list(graph.nodes())
        index = {str(n): i for i, n in enumerate(nodes)}
        wanted = [str(n) for n in nodes] if names is None else [str(n) for n in names]
        missing = [n for n in wanted if n not in index]
        if missing:
            raise FingerprintError(f"{len(missing)} customer(s) are not nodes of the graph, e.g. {missing[0]!r}")
        adj = nx.to_scipy_sparse_array(graph, nodelist=nodes, format="csr")
        cc = community_codes(adj, self.config.crc_bits, seed=seed)
        label = {}
        for ci, members in enumerate(nx.community.louvain_communities(graph, seed=seed)):
            for node in members:
                label[str(node)] = f"c{ci}"
        idx = [index[n] for n in wanted]
        return self.add_customers(wanted, [label.get(n) for n in wanted], cc.bits[idx])

    def fingerprint_of(self, code_index: int, community_code: str | None) -> np.ndarray:
        """The ``(dim,)`` fingerprint ``F`` of an identity code (and community bit string)."""
        crc = None
        if self.config.crc_bits:
            if not community_code:
                raise FingerprintError("this customer has no community code")
            crc = np.array([int(c) for c in community_code], dtype=np.uint8)
        return self.layout.compose(int(code_index), crc)

    # -- issuing --------------------------------------------------------------------------
    def copy_path(self, customer: str) -> Path:
        n = len(self.registry.issued_copies(customer)) + 1
        return self.root / COPIES_DIR / f"{_slug(customer)}-{n}.safetensors"

    def issue(self, customer: str, out: str | Path | None = None) -> IssuedCopy:
        """Issue one fingerprinted copy to ``customer``: reserve a code, fine-tune/correct, write the file,
        complete the registry record with its SHA-256. On any error the reservation is aborted and the partial
        file removed. A customer that already holds a code gets the same fingerprint again."""
        path = Path(out) if out is not None else self.copy_path(customer)

        def write(res, dest: Path) -> None:
            cust = self.registry.customer(customer)
            f = self.fingerprint_of(res.code_index, cust.community_code)
            cfg = self.issue_config
            data = self._train_data() if cfg.train != "none" else None
            if data is None and cfg.correct and cfg.correction == "activation" and self.config.data:
                data = self._train_data()
            own = self.own.component(res.code_index) if self.own is not None else None
            model, rec = issue_copy(self.base_model, f, self.carrier, data, cfg, metrics=self._metrics(cfg, data),
                                    own_component=own)
            save_model(dest, model, {"data": self.config.data, "product": self.config.name,
                                     "issue": {"seconds": rec.seconds, "steps": rec.steps}})

        return self.registry.issue_file(customer, path, write)

    def pending_customers(self, names: Iterable[str] | None = None) -> list[str]:
        """Customers (all, or among ``names``) without a complete issued copy."""
        return self.registry.pending_customers(names)

    def recover(self, older_than_s: float = 0.0) -> RecoveryReport:
        """Settle reservations left by killed issuers: complete those whose file exists and carries exactly
        the reserved code, release the others (their code returns to the pool)."""

        def carries(path: Path, res) -> bool:
            try:
                return self.identify_file(path) == [res.code_index]
            except Exception:  # noqa: BLE001 - an unreadable file is simply not usable
                return False

        return self.registry.recover(older_than_s=older_than_s, verify=carries)

    # -- tracing --------------------------------------------------------------------------
    def load_suspect(self, path: str | Path) -> nn.Module:
        """Load a suspect file safely and check it has the base model's architecture."""
        model, _meta = load_model(path)
        diff = spec_difference(dict(model.spec), dict(self.config.spec))
        if diff:
            raise FingerprintError(f"{path} does not match the product's base model ({diff})")
        base_state = self.base_model.state_dict()
        for k, v in model.state_dict().items():
            if k not in base_state or tuple(base_state[k].shape) != tuple(v.shape):
                raise FingerprintError(f"{path} does not match the product's base model (tensor {k})")
        self.carrier.check_model(model)
        return model

    def identify_file(self, path: str | Path) -> list[int]:
        """Accused code indices of a model file (empty when the decoder names nobody)."""
        return list(self._decode(self.load_suspect(path))[0].accused_codes)

    def _halves(self) -> list[AndAccCode]:
        return list(self.layout.cic.parts)

    def estimate_gain(self, y: np.ndarray) -> float:
        """The suspect's fingerprint gain ``g`` (1 for an issued copy or an average of copies).

        Attacks that shrink the carrier uniformly (pruning zeroes part of every filter mean;
        rescaling a conv and un-scaling the next layer leaves the function unchanged) scale all
        coefficients by ``g``. For up to ``k - 1`` colluders at least ``m = v - (k-1) k`` of a
        codebook's ``v`` positions lie in no colluder's block and stay at level ``g``, so ``g`` is
        estimated by the median of the ``max(1, m)`` largest coefficients (of both codebooks, for two).
        Under H0 this only rescales noise; the decoder's guard and the p-value gate still apply.
        """
        _, cic_part = self.layout.split(y)
        tops = []
        start = 0
        for code in self._halves():
            coef = np.sort(code.demodulate(cic_part[start:start + code.dim]))[::-1]
            start += code.dim
            m = max(1, code.v - (code.k - 1) * code.k)
            tops.append(float(np.median(coef[:m])))
        g = float(np.mean(tops))
        return g if g > 0 else 1.0

    def _decode(self, model: nn.Module, tau: float | None = None, gain: float | None = None):
        """``(code trace, gain, model read)``: the last is the model the carrier actually read (the own-component
        test must read the same one)."""
        # undo hidden-unit permutations / rescalings toward the base (nnmark.alignment; prod.align = False: off)
        model, self.alignment = align_to_model(model, self.base_model, self._key.child("alignment"),
                                               carriers=list(self.config.layers), enabled=getattr(self, "align", True))
        y = self.carrier.extract(model)
        issued = None
        if len(self.layout.cic.parts) > 1:  # several codebooks: which customers hold codes matters to decoding
            issued = np.fromiter(self.registry.assigned_codes(include_reserved=True), dtype=np.int64)
        if tau is None and self.config.decoder == "structural":
            tr = self.layout.trace(y, issued=issued, tau=None)
            halves = _decoding_parts(tr.cic)
            gains = [h.gain for h in halves if h.gain is not None]
            return tr, float(np.mean(gains)) if gains else None, model
        g = self.estimate_gain(y) if gain is None else float(gain)
        return self.layout.trace(y, issued=issued, tau=self.config.tau if tau is None else tau, scale=g), g, model

    def trace(self, suspect: str | Path | nn.Module, *, tau: float | None = None,
              shortlist_size: int = 20, scan: bool = True, weighting: str = "adaptive") -> TraceReport:
        """Trace a suspect model file (or model): see :class:`TraceReport` and :data:`DECISION_RULE`.

        ``tau``: use the hard-threshold decoder at this threshold instead of the product's decoder.
        ``scan``: test the own component of every customer holding a complete issued copy (default), or only
        the decoder's codes (``False``: named = decoded AND passing); codes the decoder names are always tested.
        The gate is ``alpha / n_codes`` either way. ``weighting``: the own-component read-out,
        ``"adaptive"`` (default) or ``"plain"`` (:mod:`nnmark.fingerprint.own`); either keeps the null exact.
        When the alignment to the base changed the suspect, the own components are tested in both the suspect
        as given and the aligned one: the larger ``z`` is reported and its p-value doubled (Bonferroni over the
        two reads), so a misfired alignment cannot hide a colluder and the guarantee is kept.
        """
        if isinstance(suspect, nn.Module):
            model, name, sha = suspect, "<model>", ""
            widths = {"widths": "as given", "reason": "alignment off"}
            if getattr(self, "align", True):  # split / dummy units merged back first (nnmark.unit_surgery)
                from nnmark.unit_surgery import restore_widths
                from nnmark.unit_surgery import widths as unit_widths

                model, report = restore_widths(model, unit_widths(self.base_model), self._key.child("alignment"),
                                               in_shape=self.config.spec["in_shape"])
                widths = report.to_dict()
            self.carrier.check_model(model)
        else:
            model, name, sha = self.load_suspect(suspect), str(suspect), file_sha256(suspect)
        verbatim = self.registry.find_by_sha256(sha) if sha else None
        tr, gain, read = self._decode(model, tau)
        # the own-component test reads the suspect as given and, when alignment changed it, aligned as well:
        # each read's p-value is exact, so the gate is divided by the number of reads (union bound)
        reads = [model] if read is model else [model, read]
        holders = self.registry.assigned_codes(include_reserved=True)
        customers = {c.name: c for c in self.registry.customers()}
        dec = tr.cic
        decoded = [int(c) for c in dec.accused]
        unissued = [c for c in decoded if c not in holders]
        level = self.config.alpha / self.layout.n_codes
        evidence = self._evidence(tr, unissued)
        evidence["alignment"] = self.alignment.to_dict()
        if isinstance(suspect, nn.Module):
            evidence["alignment"]["widths"] = widths
        own = self.own
        accused: list[Accusation] = []
        suspects: list[dict[str, Any]] = []
        if own is None:
            suspects = [{"customer": holders[c], "code": c, "z": None, "p_value": None} for c in decoded
                        if c in holders]
            evidence["own"] = {"tested": 0, "reason": "this product's copies carry no per-copy components"}
        else:
            # every customer who was handed a copy (complete issues), plus any decoded code still reserved
            delivered = self.registry.assigned_codes(include_reserved=False) if scan else {}
            tested = sorted(set(delivered) | {c for c in decoded if c in holders})
            zs = [own.z_scores(m, tested, weighting) if tested else np.zeros(0) for m in reads]
            z = np.max(np.stack(zs), axis=0) if tested else np.zeros(0)
            p = [min(1.0, len(reads) * z_to_p(float(v))) for v in z]  # Bonferroni over the reads
            for c, zc, pc in zip(tested, z, p, strict=True):
                cust = customers[holders[c]]
                if pc <= level:
                    accused.append(Accusation(cust.name, c, cust.community, pc, float(zc), c in decoded,
                                              float(dec.p_values[c]) if c in decoded else None))
                elif c in decoded:
                    suspects.append({"customer": cust.name, "code": c, "z": float(zc), "p_value": pc})
            named = {a.code for a in accused}
            others = np.array([zc for c, zc in zip(tested, z, strict=True) if c not in named])
            evidence["own"] = {"tested": len(tested), "scan": bool(scan), "weighting": weighting,
                               "reads": ["as given", "aligned"][: len(reads)], "level": level,
                               "max_z_not_named": float(others.max()) if others.size else None,
                               "z_level": z_level(level / len(reads)), **own.params()}
        accused.sort(key=lambda a: a.customer)
        if accused:
            status = "accused"
        elif own is None:
            status = "unprotected"
        elif unissued:
            status = "unissued-code"
        elif suspects:
            status = "weak-evidence"
        else:
            status = dec.status
            if status == "accused":  # decoded codes, none issued-and-tested (scan=False with nothing issued)
                status = "weak-evidence"
        ambiguous = [holders[int(c)] for c in getattr(dec, "ambiguous", ()) if int(c) in holders]
        shortlist = self._shortlist(tr, customers, shortlist_size) if self.config.crc_bits else []
        evidence["gain"] = gain
        evidence["alpha"] = self.config.alpha
        evidence["p_value_level"] = level
        evidence["decoder_status"] = dec.status
        return TraceReport(self.config.name, name, sha, status, accused, ambiguous, shortlist,
                           verbatim.customer if verbatim else None, evidence, suspects=suspects)

    def _evidence(self, tr, unissued: list[int]) -> dict[str, Any]:
        dec = tr.cic
        ev: dict[str, Any] = {"decoder": dec.to_dict(), "decoder_name": self.config.decoder, "tau": self.config.tau,
                              "scale": self.config.scale,
                              "code": self.config.code, "key_id": self.config.key_id}
        halves = _decoding_parts(dec)
        margins = []
        for h in halves:
            c, z = h.coefficients, h.zero_set
            margins.append({"max_coefficient_in_zero_set": float(c[z].max()) if z.any() else None,
                            "min_coefficient_outside": float(c[~z].min()) if (~z).any() else None})
        ev["coefficient_margins"] = margins
        if unissued:
            ev["unissued_codes"] = unissued
        return ev

    def _shortlist(self, tr, customers: dict, size: int) -> list[dict[str, Any]]:
        bits, strength = tr.crc_bits, tr.crc_strength
        reliable = strength >= 0.5  # bits on which (almost) all colluders agree
        out = []
        for c in customers.values():
            if not c.community_code:
                continue
            code = np.array([int(ch) for ch in c.community_code], dtype=np.uint8)
            d = int((code[reliable] != bits[reliable]).sum())
            out.append((d, c.name, c.community))
        out.sort()
        return [{"customer": n, "community": comm, "hamming": d, "bits_compared": int(reliable.sum())}
                for d, n, comm in out[:size]]

    def status(self) -> dict[str, Any]:
        """Counts of customers, codes and issues, and the product's public parameters."""
        return {"product": self.config.name, "code": self.config.code, "key_id": self.config.key_id,
                "capacity": self.layout.n_codes, **self.registry.counts()}

"""Pins every Pyro5 convention pyrorpc relies on that is not Pyro5's public API (pyrorpc/compat.py) and
the wire constants pyrorpc/protocol.py repeats: a Pyro5 upgrade that changes one fails here first."""

from __future__ import annotations

import struct

import Pyro5.client
import Pyro5.core
import Pyro5.errors
import Pyro5.protocol
import Pyro5.serializers
import Pyro5.server
import pytest

from pyrorpc import compat, protocol
from pyrorpc.codec import SERIALIZER, dumps, loads, loads_call


def test_wire_constants_match_pyro5():
    assert protocol.HEADER.format == Pyro5.protocol._header_format
    assert protocol.HEADER_SIZE == Pyro5.protocol._header_size == 40
    assert protocol.MAGIC == Pyro5.protocol._magic_number
    assert protocol.PROTOCOL_VERSION == Pyro5.protocol.PROTOCOL_VERSION
    for name in ("MSG_CONNECT", "MSG_CONNECTOK", "MSG_CONNECTFAIL", "MSG_INVOKE", "MSG_RESULT", "MSG_PING",
                 "FLAGS_EXCEPTION", "FLAGS_COMPRESSED", "FLAGS_ONEWAY", "FLAGS_BATCH", "FLAGS_ITEMSTREAMRESULT",
                 "FLAGS_KEEPSERIALIZED", "FLAGS_CORR_ID"):
        assert getattr(protocol, name) == getattr(Pyro5.protocol, name), name
    assert protocol.SERPENT_ID == Pyro5.serializers.SerpentSerializer.serializer_id


def test_our_frames_parse_as_pyro5_messages_and_back():
    data = dumps(("obj", "add", (1, 2), {}))
    ann = protocol.pack_annotations({"CORR": b"x" * 16, "ABCD": b"hello"})
    frame = protocol.pack(protocol.MSG_INVOKE, protocol.FLAGS_ONEWAY, 7, data, ann)
    msg = Pyro5.protocol.ReceivingMessage(frame[:40])
    msg.add_payload(frame[40:])
    assert (msg.type, msg.flags, msg.seq, msg.data) == (protocol.MSG_INVOKE, protocol.FLAGS_ONEWAY, 7, data)
    assert msg.annotations == {"CORR": b"x" * 16, "ABCD": b"hello"}
    sent = Pyro5.protocol.SendingMessage(protocol.MSG_RESULT, 0, 9, 1, b"payload", annotations={"WXYZ": b"12"})
    header = protocol.parse_header(sent.data, 1 << 20)
    assert (header.msg_type, header.seq, header.data_size) == (protocol.MSG_RESULT, 9, 7)
    assert protocol.parse_annotations(sent.data[40:40 + header.ann_size]) == {"WXYZ": b"12"}


def test_parse_header_refuses_what_is_not_pyro5():
    good = protocol.pack(protocol.MSG_INVOKE, 0, 1, b"abc")
    with pytest.raises(protocol.ProtocolViolation, match="not a Pyro5"):
        protocol.parse_header(b"HTTP" + good[4:], 100)
    with pytest.raises(protocol.ProtocolViolation, match="limit"):
        protocol.parse_header(good, 2)
    bad_version = good[:4] + struct.pack("!H", 501) + good[6:]
    with pytest.raises(protocol.ProtocolViolation, match="version"):
        protocol.parse_header(bad_version, 100)


class Sample:
    def plain(self):
        return 1

    @Pyro5.server.oneway
    def fire(self):
        pass

    @property
    def prop(self):
        return 2

    def _private(self):
        pass

    def __dunder__(self):
        pass


def test_expose_and_oneway_markers():
    exposed = Pyro5.server.expose(type("Exposed", (), {k: v for k, v in vars(Sample).items()
                                                        if k not in ("__dict__", "__weakref__")}))
    ours = compat.exposed_members(exposed)
    theirs = Pyro5.server._get_exposed_members(exposed)
    assert {k: set(v) for k, v in ours.items()} == {k: set(v) for k, v in theirs.items()}
    assert ours["methods"] >= {"plain", "fire"} and ours["oneway"] == {"fire"} and ours["attrs"] == {"prop"}
    assert getattr(exposed.plain, compat.EXPOSED_ATTR) is True
    assert compat.is_oneway(Sample.fire) and not compat.is_oneway(Sample.plain)
    # not exposed: nothing unless asked for every public member
    assert compat.exposed_members(Sample)["methods"] == set(Pyro5.server._get_exposed_members(Sample)["methods"])
    assert compat.exposed_members(Sample, only_exposed=False)["methods"] == {"plain", "fire"}


@pytest.mark.parametrize("name", ["x", "_x", "__x", "__init__", "__call__", "__getattr__", "__len__",
                                  "__dunder__", "___", "__class__", "__reduce_ex__", "__enter__"])
def test_private_names_as_pyro5_sees_them(name):
    assert compat.is_private(name) == Pyro5.server.is_private_attribute(name)


def test_remote_traceback_attribute_travels():
    exc = ValueError("boom")
    compat.set_remote_traceback(exc, ["line 1\n", "line 2\n"])
    back = Pyro5.serializers.SerpentSerializer().loads(dumps(exc))  # what a stock client rebuilds
    assert isinstance(back, ValueError) and back._pyroTraceback == ["line 1\n", "line 2\n"]
    assert compat.remote_traceback(back) == ["line 1\n", "line 2\n"]
    assert compat.remote_traceback(ValueError("local")) is None


def test_exception_wrapper_is_what_pyro5_batches_use():
    wrapped = Pyro5.serializers.SerpentSerializer().loads(dumps([1, compat.wrap_exception(KeyError("k"))]))
    assert wrapped[0] == 1 and isinstance(wrapped[1], Pyro5.core._ExceptionWrapper)
    assert compat.is_exception_wrapper(wrapped[1])
    assert isinstance(compat.unwrap_exception(wrapped[1]), KeyError)
    wrapper = Pyro5.core._ExceptionWrapper
    assert compat.EXCEPTION_WRAPPER == f"{wrapper.__module__}.{wrapper.__name__}"


def test_proxy_reference_state_is_pyro5_proxy_state():
    stock = Pyro5.client.Proxy("PYRO:thing@127.0.0.1:1234")
    stock._pyroMethods = {"a"}
    state = stock.__getstate__()
    assert state[0] == "PYRO:thing@127.0.0.1:1234" and state[2] == ("a",) and len(state) == 6
    # what pyrorpc.callbacks sends decodes as a stock Pyro5 Proxy for a stock peer
    ref = {"__class__": "Pyro5.client.Proxy", "state": ("PYRO:thing@127.0.0.1:1234", (), ("a",), (), "hello",
                                                          "serpent")}
    proxy = Pyro5.serializers.SerpentSerializer().loads(dumps(ref))
    assert isinstance(proxy, Pyro5.client.Proxy) and str(proxy._pyroUri) == "PYRO:thing@127.0.0.1:1234"
    proxy._pyroRelease()


def test_fast_codec_matches_serpent():
    import hypothesis
    from hypothesis import strategies as st

    leaves = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.text(max_size=20),
                       st.binary(max_size=20), st.complex_numbers(allow_nan=False, max_magnitude=1e6))
    values = st.recursive(leaves, lambda inner: st.one_of(
        st.lists(inner, max_size=5), st.tuples(inner, inner), st.dictionaries(st.text(max_size=5), inner, max_size=4),
        st.frozensets(st.integers(), max_size=4)), max_leaves=20)

    @hypothesis.settings(max_examples=300, deadline=None)
    @hypothesis.given(values)
    def check(value):
        import serpent
        data = dumps(value)  # our encoder: what serpent itself reads back from serpent's own output
        reference = serpent.dumps(value, module_in_classname=True, bytes_repr=True)
        assert _same(serpent.loads(data), serpent.loads(reference))
        assert _same(loads(data), SERIALIZER.recreate_classes(serpent.loads(data)))  # our decoder
        assert _same(loads(reference), SERIALIZER.recreate_classes(serpent.loads(reference)))

    check()


def test_request_decoder_matches_serpent():
    """``loads_call`` (the worker's request decoder, with its fast paths for the object id, the method name
    and a call without arguments) reads every request as serpent does, and refuses what serpent refuses."""
    import hypothesis
    import serpent
    from hypothesis import strategies as st

    leaves = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.text(max_size=20),
                       st.binary(max_size=10))
    values = st.recursive(leaves, lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.tuples(inner, inner), st.dictionaries(st.text(max_size=5), inner, max_size=3)),
        max_leaves=12)
    names = st.one_of(st.sampled_from(["calc", "Pyro.Daemon", "obj_5f3a", "", "it's", 'a"b', "a\\b", "x\ny", "é"]),
                      st.text(max_size=12))
    calls = st.tuples(names, names, st.one_of(st.tuples(), st.lists(values, max_size=3).map(tuple)),
                      st.dictionaries(st.text(max_size=6), values, max_size=3))

    @hypothesis.settings(max_examples=400, deadline=None)
    @hypothesis.given(calls)
    def check(call):
        for data in (dumps(call), serpent.dumps(call, module_in_classname=True, bytes_repr=True)):
            assert _same(loads_call(data), SERIALIZER.recreate_classes(serpent.loads(data)))

    check()
    header = b"# serpent utf-8 python3.2\n"
    for bad in (b"('a','b',(),{}", b"('a','b',(),{}))", b"('a','b',(),{})x", b"('a','b',()(),{})",
                b"('a','b',(),{},,)"):
        with pytest.raises((ValueError, SyntaxError)):
            serpent.loads(header + bad)
        with pytest.raises((ValueError, SyntaxError)):
            loads_call(header + bad)
    # shapes serpent reads that are no 4-tuple come back as they are (the worker then refuses the request)
    assert loads_call(header + b"('a','b',)") == ("a", "b")
    assert loads_call(header + b"('a','b',1,2,3)") == ("a", "b", 1, 2, 3)


def test_flat_request_fast_path_matches_serpent():
    """Requests whose arguments are scalars, flat lists or flat dicts (what ``lease`` and ``renew`` send) take
    ``loads_call``'s flat path: same values and types as serpent, and odd shapes still go to the full parser."""
    import hypothesis
    import serpent
    from hypothesis import strategies as st

    scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.text(max_size=12))
    items = st.one_of(scalars, st.lists(scalars, max_size=4), st.dictionaries(
        st.one_of(st.text(max_size=8), st.integers()), scalars, max_size=4))
    calls = st.tuples(st.just("Pyro.NameServer"), st.just("renew"), st.lists(items, max_size=5).map(tuple),
                      st.dictionaries(st.text(max_size=6), scalars, max_size=3))

    @hypothesis.settings(max_examples=400, deadline=None)
    @hypothesis.given(calls)
    def check(call):
        for data in (dumps(call), serpent.dumps(call, module_in_classname=True, bytes_repr=True)):
            assert _same(loads_call(data), SERIALIZER.recreate_classes(serpent.loads(data)))

    check()
    header = b"# serpent utf-8 python3.2\n"
    for body in (b"('a','b',(1),{})", b"('a','b',[1,2],{})", b"('a','b',(1,),{1:2,})", b"('a','b',(007,),{})",
                 b"('a','b',(1.e5,),{})", b"('a','b',(0e0,-0.0,1e999,),{})", b"('a','b',({'x':1,'x':2},),{})",
                 b"('a','b',( 1,),{})", b"('a','b',({1,2},),{})",
                 b"('a','b',({'__class__':'float','value':'nan'},),{})",
                 b"('a','b',('it''s',),{})", b"('a','b',(\"it's\",[],{}),{'k':[1]})"):
        try:
            expected = SERIALIZER.recreate_classes(serpent.loads(header + body))
        except (ValueError, SyntaxError):
            with pytest.raises((ValueError, SyntaxError)):
                loads_call(header + body)
            continue
        got = loads_call(header + body)
        assert _same(got, expected) or (isinstance(expected[2][0], float) and expected[2][0] != expected[2][0]), body


def _same(a, b):
    """Equal, and of the same types all the way down (1 == 1.0 == True would hide a decoding bug)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, float):
        return repr(a) == repr(b)
    return a == b


def test_correlation_id_and_annotations_reach_the_method_and_come_back():
    """A stock Pyro5 client's correlation id and annotations are the method's current_context values, and
    a reply carries the request's correlation id back."""
    import uuid

    import Pyro5.api
    from Pyro5.callcontext import current_context

    import pyrorpc
    from pyrorpc.security import open_connection

    seen = {}

    @pyrorpc.service("ctx")
    class Ctx:
        def look(self):
            seen["corr"] = current_context.correlation_id
            seen["ann"] = dict(current_context.annotations)
            return True

    with pyrorpc.WorkerHost(Ctx, register=False) as host:
        corr = uuid.uuid4()
        current_context.correlation_id = corr
        current_context.annotations = {"XTRA": b"hello"}
        try:
            with Pyro5.api.Proxy(host.uri) as proxy:
                assert proxy.look() is True
        finally:
            current_context.correlation_id = None
            current_context.annotations = {}
        assert seen["corr"] == corr and seen["ann"].get("XTRA") == b"hello"
        conn, _meta = open_connection(Pyro5.core.URI(host.uri), pyrorpc.Settings())
        try:
            conn.send(protocol.pack(protocol.MSG_INVOKE, protocol.FLAGS_CORR_ID, 5,
                                    dumps((host.name, "look", (), {})), corr_id=corr.bytes))
            header = protocol.parse_header(conn.read_header(), 1 << 20)
            conn._read(header.ann_size + header.data_size)
            assert header.seq == 5 and header.flags & protocol.FLAGS_CORR_ID and header.corr_id == corr.bytes
        finally:
            conn.close()

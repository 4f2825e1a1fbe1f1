"""A scenario run through the official Tencent CMQ Python SDK (qcloud-cmq-sdk-py3, unpatched)
against cmqd's CMQ-compatible HTTP API. Started by tests/it/cmq_sdk.rs, which passes the
endpoint and an account in CMQ_ENDPOINT, CMQ_SECRET_ID and CMQ_SECRET_KEY (and, against a
cluster, CMQ_PAUSE_BEFORE: see step()).

Every step checks what the SDK returns; the first failure raises and exits non-zero.
"""

import logging
import os
import signal
import sys
import threading
import time
import types

# The whole scenario takes seconds; never hang a test run.
signal.alarm(240)

# cmq/subscription.py imports mailcap (and never uses it); Python 3.13 removed that module.
# Providing a stand-in keeps the SDK itself untouched.
try:
    import mailcap  # noqa: F401
except ImportError:
    stand_in = types.ModuleType("mailcap")
    stand_in.subst = lambda *args, **kwargs: None
    sys.modules["mailcap"] = stand_in

from cmq.account import Account  # noqa: E402
from cmq.cmq_exception import CMQServerException  # noqa: E402
from cmq.queue import Message, QueueMeta  # noqa: E402
from cmq.subscription import SubscriptionMeta  # noqa: E402
from cmq.topic import Message as TopicMessage  # noqa: E402
from cmq.topic import TopicMeta  # noqa: E402

ENDPOINT = os.environ["CMQ_ENDPOINT"]
SECRET_ID = os.environ["CMQ_SECRET_ID"]
SECRET_KEY = os.environ["CMQ_SECRET_KEY"]


# Set by the cluster test: before the step named CMQ_PAUSE_BEFORE the scenario prints PAUSED
# and reads a line from its standard input (the test kills the leader, then writes it; the
# scenario's alarm bounds the wait).
PAUSE_BEFORE = os.environ.get("CMQ_PAUSE_BEFORE")


def step(name):
    if name == PAUSE_BEFORE:
        print("PAUSED", flush=True)
        check(sys.stdin.readline() != "", "the test closed stdin instead of resuming")
    print("--", name, flush=True)


def check(condition, what):
    if not condition:
        raise AssertionError(what)


def expect_error(code, call, *args):
    try:
        call(*args)
    except CMQServerException as error:
        check(error.code == code, "expected code %d, got %s" % (code, error))
        return error
    raise AssertionError("expected error %d, the call succeeded" % code)


def new_account():
    account = Account(ENDPOINT, SECRET_ID, SECRET_KEY)
    # The SDK logs every reply field at debug level (to CMQ_python_sdk.log in the working
    # directory): a field it expects and does not find fails the call.
    account.set_log_level(logging.DEBUG)
    return account


def drain(queue, expected):
    """Receives until `expected` messages came (batch receives return what is there)."""
    bodies, handles = [], []
    deadline = time.time() + 10
    while len(bodies) < expected and time.time() < deadline:
        try:
            batch = queue.batch_receive_message(16, 1)
        except CMQServerException as error:
            check(error.code == 7000, "unexpected error %s" % error)
            continue
        bodies += [m.msgBody for m in batch]
        handles += [m.receiptHandle for m in batch]
    if handles:
        queue.batch_delete_message(handles)
    return sorted(bodies)


def main():
    account = new_account()

    step("create a queue with attributes and read them back")
    queue = account.get_queue("sdk-orders")
    meta = QueueMeta()
    meta.maxMsgHeapNum = 1000000
    meta.pollingWaitSeconds = 3
    meta.visibilityTimeout = 45
    meta.maxMsgSize = 8192
    meta.msgRetentionSeconds = 7200
    meta.rewindSeconds = 3600
    queue.create(meta)
    got = queue.get_attributes()
    check(got.maxMsgHeapNum == 1000000, "maxMsgHeapNum %s" % got.maxMsgHeapNum)
    check(got.pollingWaitSeconds == 3, "pollingWaitSeconds")
    check(got.visibilityTimeout == 45, "visibilityTimeout")
    check(got.maxMsgSize == 8192, "maxMsgSize")
    check(got.msgRetentionSeconds == 7200, "msgRetentionSeconds")
    check(got.rewindSeconds == 3600, "rewindSeconds")
    check(got.activeMsgNum == 0 and got.inactiveMsgNum == 0, "empty queue")
    check(abs(got.createTime - time.time()) < 60, "createTime in seconds: %s" % got.createTime)
    meta.visibilityTimeout = 50
    queue.set_attributes(meta)
    check(queue.get_attributes().visibilityTimeout == 50, "set_attributes")
    expect_error(4460, queue.create, meta)

    step("send and receive")
    sent = queue.send_message(Message("hello cmqd"))
    received = queue.receive_message(1)
    check(received.msgBody == "hello cmqd", "body %r" % received.msgBody)
    check(received.msgId == sent.msgId, "msgId")
    check(received.dequeueCount == 1, "dequeueCount")
    check(49 <= received.nextVisibleTime - received.firstDequeueTime <= 51, "visibility")
    check(queue.get_attributes().inactiveMsgNum == 1, "inactiveMsgNum")
    queue.delete_message(received.receiptHandle)
    expect_error(4430, queue.delete_message, received.receiptHandle)

    step("batch send, batch receive, batch delete")
    sent = queue.batch_send_message([Message("batch-%d" % i) for i in range(5)])
    check(len(sent) == 5 and len({m.msgId for m in sent}) == 5, "batch ids")
    got = queue.batch_receive_message(16, 1)
    check(sorted(m.msgBody for m in got) == ["batch-%d" % i for i in range(5)], "batch bodies")
    queue.batch_delete_message([m.receiptHandle for m in got])
    expect_error(7000, queue.receive_message, 0)

    step("receive with long polling")

    def send_later():
        time.sleep(1)
        new_account().get_queue("sdk-orders").send_message(Message("late"))

    sender = threading.Thread(target=send_later)
    started = time.time()
    sender.start()
    received = queue.receive_message(10)
    elapsed = time.time() - started
    sender.join()
    check(received.msgBody == "late", "long-polled body")
    check(0.5 < elapsed < 8, "woken by the send, after %.2f s" % elapsed)
    queue.delete_message(received.receiptHandle)
    # The queue's pollingWaitSeconds (3) is the default wait.
    started = time.time()
    expect_error(7000, queue.receive_message)
    check(time.time() - started >= 2.5, "default long poll")

    step("delayed send")
    queue.send_message(Message("delayed"), 2)
    expect_error(7000, queue.receive_message, 0)
    check(queue.get_attributes().delayMsgNum == 1, "delayMsgNum")
    started = time.time()
    received = queue.receive_message(10)
    check(received.msgBody == "delayed", "delayed body")
    check(time.time() - started > 0.5, "delivered after the delay")
    queue.delete_message(received.receiptHandle)

    step("rewind")
    rewind = account.get_queue("sdk-rewind")
    rewind_meta = QueueMeta()
    rewind_meta.rewindSeconds = 600
    rewind.create(rewind_meta)
    before = int(time.time()) - 2
    rewind.batch_send_message([Message("r1"), Message("r2")])
    check(drain(rewind, 2) == ["r1", "r2"], "consumed")
    expect_error(7000, rewind.receive_message, 0)
    rewind.rewindQueue(before)
    check(drain(rewind, 2) == ["r1", "r2"], "rewound")

    step("topic with tags, subscriptions to queues")
    for name in ["sdk-sports", "sdk-all"]:
        account.get_queue(name).create(QueueMeta())
    topic = account.get_topic("sdk-news")
    topic_meta = TopicMeta()
    topic_meta.filterType = 1
    topic.create(topic_meta)
    attributes = topic.get_attributes()
    check(attributes.filterType == 1, "filterType")
    check(attributes.maxMsgSize == 65536, "topic maxMsgSize")
    check(attributes.msgRetentionSeconds == 86400, "topic retention")
    topic_meta.maxMsgSize = 32768
    topic.set_attributes(topic_meta)
    check(topic.get_attributes().maxMsgSize == 32768, "topic set_attributes")

    sports = account.get_subscription("sdk-news", "sports")
    sub_meta = SubscriptionMeta()
    sub_meta.Endpoint = "sdk-sports"
    sub_meta.Protocal = "queue"
    sub_meta.NotifyContentFormat = "SIMPLIFIED"
    sub_meta.FilterTag = ["sports"]
    sports.create(sub_meta)
    everything = account.get_subscription("sdk-news", "all")
    all_meta = SubscriptionMeta()
    all_meta.Endpoint = "sdk-all"
    all_meta.Protocal = "queue"
    all_meta.NotifyContentFormat = "SIMPLIFIED"
    everything.create(all_meta)
    got = sports.get_attributes()
    check(got.FilterTag == ["sports"], "filterTag %r" % got.FilterTag)
    check(got.Protocal == "queue", "protocol")
    check(got.NotifyContentFormat == "SIMPLIFIED", "notifyContentFormat")
    check(got.NotifyStrategy == "EXPONENTIAL_DECAY_RETRY", "notifyStrategy")

    step("publish and batch publish")
    published = topic.publish_message(TopicMessage("goal", ["sports"]))
    check(published.msgId != "", "published msgId")
    topic.publish_message(TopicMessage("rain", ["weather"]))
    batch = topic.batch_publish_message(
        [TopicMessage("b1"), TopicMessage("b2")], ["sports", "tennis"]
    )
    check(len(batch) == 2, "batch publish ids")
    check(drain(account.get_queue("sdk-sports"), 3) == ["b1", "b2", "goal"], "tag routing")
    check(
        drain(account.get_queue("sdk-all"), 4) == ["b1", "b2", "goal", "rain"],
        "untagged subscription gets everything",
    )
    change = SubscriptionMeta()
    change.NotifyContentFormat = "SIMPLIFIED"
    change.FilterTag = ["weather"]
    sports.set_attributes(change)
    topic.publish_message(TopicMessage("sun", ["weather"]))
    check(drain(account.get_queue("sdk-sports"), 1) == ["sun"], "new filterTag")
    sports.clearFilterTags()
    check(sports.get_attributes().FilterTag == [], "cleared filterTag")
    drain(account.get_queue("sdk-all"), 1)

    step("topic with binding keys")
    for name in ["sdk-eu", "sdk-every"]:
        account.get_queue(name).create(QueueMeta())
    routed = account.get_topic("sdk-routed")
    routed_meta = TopicMeta()
    routed_meta.filterType = 2
    routed.create(routed_meta)
    check(routed.get_attributes().filterType == 2, "filterType 2")
    for name, endpoint, keys in [("eu", "sdk-eu", ["eu.*.orders"]), ("every", "sdk-every", ["#"])]:
        meta = SubscriptionMeta()
        meta.Endpoint = endpoint
        meta.Protocal = "queue"
        meta.NotifyContentFormat = "SIMPLIFIED"
        meta.bindingKey = keys
        account.get_subscription("sdk-routed", name).create(meta)
    no_key = SubscriptionMeta()
    no_key.Endpoint = "sdk-every"
    no_key.Protocal = "queue"
    no_key.NotifyContentFormat = "SIMPLIFIED"
    expect_error(4000, account.get_subscription("sdk-routed", "nokey").create, no_key)
    got = account.get_subscription("sdk-routed", "eu").get_attributes()
    check(got.bindingKey == ["eu.*.orders"], "bindingKey %r" % got.bindingKey)
    routed.publish_message(TopicMessage("de"), "eu.de.orders")
    routed.publish_message(TopicMessage("ny"), "us.ny.orders")
    routed.batch_publish_message([TopicMessage("fr1"), TopicMessage("fr2")], [], "eu.fr.orders")
    check(drain(account.get_queue("sdk-eu"), 3) == ["de", "fr1", "fr2"], "binding keys")
    check(drain(account.get_queue("sdk-every"), 4) == ["de", "fr1", "fr2", "ny"], "#")

    step("list queues, topics and subscriptions with paging")
    for i in range(5):
        account.get_queue("sdk-page-%d" % i).create(QueueMeta())
    names, offset = [], 0
    while True:
        total, page, next_offset = account.list_queue("sdk-page", 2, offset)
        check(total == 5, "queue totalCount %d" % total)
        check(len(page) <= 2, "queue page size")
        check(all(q["queueId"] and q["queueName"] for q in page), "queue entries")
        names += [q["queueName"] for q in page]
        if next_offset == "":
            break
        offset = next_offset
    check(sorted(names) == ["sdk-page-%d" % i for i in range(5)], "queue pages %r" % names)
    total, page, _ = account.list_queue()
    check(total >= 11 and len(page) == min(total, 20), "default page")
    for i in range(3):
        account.get_topic("sdk-tpage-%d" % i).create(TopicMeta())
    names, offset = [], 0
    while True:
        total, page, next_offset = account.list_topic("sdk-tpage", 2, offset)
        check(total == 3, "topic totalCount")
        names += [t["topicName"] for t in page]
        if next_offset == "":
            break
        offset = next_offset
    check(sorted(names) == ["sdk-tpage-%d" % i for i in range(3)], "topic pages %r" % names)
    total, page, next_offset = topic.list_subscription("", 1, 0)
    check(total == 2 and len(page) == 1 and next_offset == 1, "subscription page 1")
    total, page2, next_offset = topic.list_subscription("", 1, 1)
    check(total == 2 and len(page2) == 1 and next_offset == "", "subscription page 2")
    names = sorted([page[0]["subscriptionName"], page2[0]["subscriptionName"]])
    check(names == ["all", "sports"], "subscriptions %r" % names)
    check(page[0]["protocol"] == "queue", "subscription protocol")

    step("HmacSHA256 and GET")
    account.set_sign("sha256")
    check(account.list_topic("sdk-news")[0] == 1, "sha256")
    account.get_client().set_method("GET")
    queue.send_message(Message("by GET, signed with sha256"))
    check(queue.receive_message(1).msgBody == "by GET, signed with sha256", "GET")
    account.get_client().set_method("POST")
    account.set_sign("sha1")

    step("a wrong key is refused")
    wrong = Account(ENDPOINT, SECRET_ID, SECRET_KEY + "-wrong")
    expect_error(4100, wrong.list_queue)
    unknown = Account(ENDPOINT, "AKIDnobodyAtAll", SECRET_KEY)
    expect_error(4100, unknown.get_queue("sdk-orders").send_message, Message("x"))

    step("clean up")
    expect_error(4000, topic.delete)
    sports.delete()
    everything.delete()
    topic.delete()
    for name in ["eu", "every"]:
        account.get_subscription("sdk-routed", name).delete()
    routed.delete()
    for i in range(3):
        account.get_topic("sdk-tpage-%d" % i).delete()
    check(account.list_topic()[0] == 0, "topics deleted")
    total, page, _ = account.list_queue("", 50)
    for entry in page:
        account.get_queue(entry["queueName"]).delete()
    check(account.list_queue()[0] == 0, "queues deleted")
    expect_error(4440, queue.get_attributes)

    print("SCENARIO OK", flush=True)


if __name__ == "__main__":
    main()

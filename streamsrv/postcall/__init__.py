"""The post-call pass: a queue of jobs in Postgres, a worker that transcribes each call's
recording with the post-call model, and uploads of recordings that did not come over AudioSocket.
"""

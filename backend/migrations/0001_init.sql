-- Users, chat threads and their steps (the Chainlit history), feedback.
CREATE TABLE users (
    id            uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    identifier    text NOT NULL UNIQUE,
    password_hash text NOT NULL,
    role          text NOT NULL CHECK (role IN ('user', 'kb_admin', 'admin')),
    metadata      jsonb NOT NULL DEFAULT '{}',
    created_at    timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE threads (
    id         text PRIMARY KEY,
    user_id    uuid REFERENCES users (id) ON DELETE CASCADE,
    name       text,
    tags       text[] NOT NULL DEFAULT '{}',
    metadata   jsonb NOT NULL DEFAULT '{}',
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX threads_user_updated ON threads (user_id, updated_at DESC);

CREATE TABLE steps (
    id         text PRIMARY KEY,
    thread_id  text NOT NULL REFERENCES threads (id) ON DELETE CASCADE,
    parent_id  text,
    name       text NOT NULL DEFAULT '',
    type       text NOT NULL,
    input      text NOT NULL DEFAULT '',
    output     text NOT NULL DEFAULT '',
    is_error   boolean NOT NULL DEFAULT false,
    metadata   jsonb NOT NULL DEFAULT '{}',
    extra      jsonb NOT NULL DEFAULT '{}',
    start_time text,
    end_time   text,
    created_at timestamptz NOT NULL DEFAULT clock_timestamp(),
    seq        bigserial
);
CREATE INDEX steps_thread_seq ON steps (thread_id, seq);

CREATE TABLE feedbacks (
    id         text PRIMARY KEY,
    step_id    text NOT NULL REFERENCES steps (id) ON DELETE CASCADE,
    value      integer NOT NULL,
    comment    text,
    created_at timestamptz NOT NULL DEFAULT now()
);

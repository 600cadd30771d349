"""What a node operator installs to decide which code runs on the node: the node runtime (`fedchat node
start`) and the app bundles it approves.

Imports nothing: the runtime's runner (`python -I -m fedchat.node.runtime`) must import none of client/,
server/ or shared/ before the approved bundle is loaded (fedchat/node/runtime.py says why).
"""
